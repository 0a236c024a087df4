"""Dagster end to end on a temporary folder of tiny datasets, with the tiny random model: real instance, real
multiprocess runs, a real DuckDB file; then the sensor's view of added, changed and removed files."""

import json
import re

import dagster as dg
import duckdb
import pandas as pd
import pytest

from grouplora.orchestration.partitions import dataset_partitions


@pytest.fixture()
def project(plain_project):
    return plain_project


def test_pipeline_materializes_through_dagster_into_duckdb(project):
    from grouplora.orchestration import run
    from grouplora.orchestration.resources import make_resources

    sources = make_resources()["sources"]
    versions = {n: sources.version(n) for n in sources.files()}
    assert sorted(versions) == ["facts", "parity", "reviews"]
    # One dataset through the multiprocess executor (every step in its own process, as on a cluster), the
    # others in process (faster): both must give the same kind of artifacts.
    assert run.run_datasets(["facts"], versions, executor="multiprocess") == (["facts"], {})
    from grouplora.orchestration.resources import _load_model
    _load_model.cache_clear()
    assert run.run_datasets(versions, versions, executor="in_process") == (["parity", "reviews"], {})
    run.run_suite(executor="in_process")
    # two partition runs and the suite in this process: the model was loaded once, and every step took its LoRA
    # layers off the shared base again
    assert (_load_model.cache_info().misses, _load_model.cache_info().currsize) == (1, 1)
    assert not any("lora" in n for n, _ in make_resources()["base_model"].load()[0].named_modules())

    db = project / "var" / "warehouse.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        counts = dict(con.execute("SELECT dataset, count(*) FROM datasets GROUP BY 1").fetchall())
        report = con.execute("SELECT dataset, split, n, accuracy, chance FROM zero_shot_report").fetchall()
        features = con.execute("SELECT dataset, split, f0, features FROM gradient_features").to_arrow_table()
        fit_rows = con.execute("SELECT count(*) FROM datasets WHERE split IN ('train', 'validation')").fetchone()[0]
        kinds = dict(con.execute("SELECT kind, count(DISTINCT subset_id) FROM subset_estimates "
                                 "WHERE mode = 'linearized' GROUP BY 1").fetchall())
        affinity = con.execute("SELECT target, source, n_subsets FROM subset_affinity").fetchall()
        pairwise = con.execute("SELECT target, source, loss_reduction FROM pairwise_affinity").fetchall()
        verified = con.execute("SELECT dataset, linearized_loss, forward_loss FROM estimate_verification").fetchall()
        lines = con.execute("SELECT dataset, most_helpful FROM affinity_report").fetchall()
    assert counts == {"facts": 18, "parity": 18, "reviews": 24}
    assert {(d, s) for d, s, *_ in report} == {(d, s) for d in counts for s in ("train", "validation", "test")}
    assert all(0.0 <= acc <= 1.0 and chance == 0.5 for *_, acc, chance in report)
    assert sum(n for _, _, n, _, _ in report) == 60
    # features: train + validation rows only, FLOAT[200] read back through Arrow
    assert features.num_rows == fit_rows and set(features.column("split").to_pylist()) == {"train", "validation"}
    assert features.schema.field("features").type.list_size == 200
    assert kinds == {"singleton": 3, "pair": 3, "random": 1}
    assert sorted(affinity) == [(t, s, 1) for t in sorted(counts) for s in sorted(counts)]
    assert len(pairwise) == 6 and all(t != s for t, s, _ in pairwise)
    assert verified and all(lin > 0 and fwd > 0 for _, lin, fwd in verified)
    assert sorted(d for d, _ in lines) == sorted(counts)

    # partition -> one adapter per group + the all-datasets baseline -> ensemble and results table
    spec = json.loads((project / "var" / "storage" / "partition" / "task_partition.json").read_text())
    assert sorted(m for g in spec["groups"] for m in g["members"]) == sorted(counts)
    keys = [g["key"] for g in spec["groups"]] + [spec["baseline"]["key"]]
    assert run.run_adapters(keys, executor="in_process") == (keys, {})
    assert run.run_adapters(keys, executor="in_process") == ([], {})  # content-keyed: nothing retrains
    for key in keys:
        folder = project / "var" / "storage" / "adapters" / key
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    run.run_ensemble(executor="in_process")
    assert _load_model.cache_info().misses == 1  # adapters and ensemble too: still the one load
    assert not any("lora" in n for n, _ in make_resources()["base_model"].load()[0].named_modules())
    results = pd.read_parquet(project / "var" / "storage" / "ensemble" / "results.parquet")
    assert sorted(results["dataset"]) == sorted(counts)
    for method in ("zero_shot", "one_adapter_all", "grouped", "grouped_boosted", "ensemble"):
        assert results[method].between(0, 1).all()
    with duckdb.connect(str(db), read_only=True) as con:
        report = con.execute("SELECT dataset, ensemble FROM accuracy_report").fetchall()
    assert [d for d, _ in report] == sorted(counts) + ["MEAN"]
    assert abs(report[-1][1] - results["ensemble"].mean()) < 1e-9
    from grouplora.ml.ensemble import Ensemble
    ens = Ensemble.load(project / "var" / "storage" / "ensemble" / "current" / "ensemble.json")
    assert set(ens.weights) == set(counts) and all((ens.root / a.path).is_dir() for a in ens.adapters)

    # both boosting modes write a peft adapter for a group: ridge (no training) ran above when a group's loss
    # stayed high; the trained mode (a loss-weighted adapter) is checked here on the same state
    import logging
    from grouplora.assets.ensemble import boost_group
    from grouplora.orchestration.settings import EnsembleSettings, TrainingSettings
    resources = make_resources()
    model, tok = resources["base_model"].load()
    group = spec["groups"][0]
    name = boost_group(resources["store"], resources["base_model"], resources["gradient_settings"],
                       EnsembleSettings(boost_mode="trained"), TrainingSettings(epochs=1), group,
                       Ensemble.load(project / "var" / "storage" / "ensemble" / "current" / "ensemble.json"),
                       model, tok, logging.getLogger("test"))
    boost_dir = project / "var" / "storage" / "adapters" / name
    assert (boost_dir / "adapter_model.safetensors").exists() and json.loads((boost_dir / "adapter_config.json").read_text())

    # registered in MLflow: the first version is the challenger and, with no champion before it, the champion
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'var' / 'mlflow' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("grouplora-ensemble", "challenger").version) == "1"
    assert str(client.get_model_version_by_alias("grouplora-ensemble", "champion").version) == "1"

    instance = run.get_instance()
    checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("dataset"), "dataset_schema")])
    assert checks, "the schema check ran"
    # A rerun with nothing changed resumes: no partition runs again.
    assert run.run_datasets(versions, versions) == ([], {})

    # A bad new version fails with the file, row and problem, and leaves the previous good artifact in place.
    stored = project / "var" / "storage" / "datasets" / "reviews.parquet"
    good = stored.read_bytes()
    (project / "datasets" / "reviews.csv").write_text("text,label\nonly,pos\nclass,pos\n")
    versions["reviews"] = sources.version("reviews")
    ran, failed = run.run_datasets(["reviews"], versions)
    assert ran == [] and list(failed) == ["reviews"]
    assert failed["reviews"].input_errors() and len(failed["reviews"].lines()) == 1
    assert re.fullmatch(r"dataset: .*reviews.csv: only one class \('pos'\): .*", failed["reviews"].lines()[0])
    assert stored.read_bytes() == good


def test_adapter_partitions_depend_on_all_dataset_partitions():
    """The daemon backfills new adapter keys; with an identity mapping it would look for dataset partitions named
    like adapter keys and fail (seen in the demo)."""
    from grouplora.orchestration.definitions import defs

    mapping = defs.resolve_asset_graph().get_partition_mapping(dg.AssetKey("adapter"), dg.AssetKey("dataset"))
    assert isinstance(mapping, dg.AllPartitionMapping)


def test_sensor_adds_changes_and_removes_partitions(project, tick_sensor):
    from grouplora.orchestration.resources import make_resources
    from grouplora.orchestration.sensors import dataset_files_sensor

    resources = {"sources": make_resources()["sources"]}
    with dg.instance_for_test() as instance:
        def tick(cursor):
            return tick_sensor(dataset_files_sensor, instance, cursor, resources)

        first = tick(None)
        assert sorted(r.partition_key for r in first.run_requests) == ["facts", "parity", "reviews"]
        assert sorted(instance.get_dynamic_partitions(dataset_partitions.name)) == ["facts", "parity", "reviews"]
        assert tick(first.cursor).run_requests == []  # nothing changed, nothing runs

        with open(project / "datasets" / "reviews.csv", "a") as f:
            f.write("a brand new review,pos\n")
        changed = tick(first.cursor)
        assert [r.partition_key for r in changed.run_requests] == ["reviews"]

        (project / "datasets" / "parity.jsonl").unlink()
        removed = tick(changed.cursor)
        # no dataset run; one suite run, so the suite-wide assets are rebuilt without the removed dataset
        assert [(r.job_name, r.partition_key) for r in removed.run_requests] == [("suite_job", None)]
        assert sorted(instance.get_dynamic_partitions(dataset_partitions.name)) == ["facts", "reviews"]
