"""Dagster end to end on a temporary folder of tiny datasets, with the tiny random model: real instance, real
multiprocess runs, a real DuckDB file; then the sensor's view of added, changed and removed files."""

import json
import os
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
    # λ is calibrated in the chain (real fine-tunes from the features' θ0), and the estimates use it
    instance = run.get_instance()
    cal = json.loads((project / "var" / "storage" / "calibration" / "features.json").read_text())
    assert cal["source"] == "calibrated" and cal["theta0"] == "fresh_lora" and cal["lam"] in cal["grid"]
    assert len(cal["runs"]) == 2 and all(r["steps"] > 0 for r in cal["runs"].values())
    best = min((r for r in cal["table"] if "calibration" in r),
               key=lambda r: r["calibration"]["mean_relative_error_loss"])
    assert best["lam"] == cal["lam"]
    cal_md = instance.get_latest_materialization_event(dg.AssetKey("lam_calibration")).asset_materialization.metadata
    assert cal_md["lam"].value == cal["lam"] and cal_md["source"].value == "calibrated"
    assert "mean_relative_error_loss" in cal_md["error_table"].value
    est_md = instance.get_latest_materialization_event(dg.AssetKey("subset_estimates")).asset_materialization.metadata
    assert est_md["lam"].value == cal["lam"] and est_md["lam_source"].value == "calibrated"
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
    for key in keys:  # each adapter kept its best epoch on the selection fold of its members' validation
        res = json.loads((project / "var" / "storage" / "adapters" / f"{key}.result.json").read_text())
        assert 1 <= res["best_epoch"] <= res["epochs"] and len(res["val_losses"]) == res["epochs"] and res["steps"] > 0
        assert res["best_epoch"] == 1 + min(range(res["epochs"]), key=lambda e: res["val_losses"][e])
    run.run_ensemble(executor="in_process")
    assert _load_model.cache_info().misses == 1  # adapters and ensemble too: still the one load
    assert not any("lora" in n for n, _ in make_resources()["base_model"].load()[0].named_modules())
    results = pd.read_parquet(project / "var" / "storage" / "ensemble" / "results.parquet")
    assert sorted(results["dataset"]) == sorted(counts)
    for method in ("zero_shot", "one_adapter_all", "grouped", "grouped_boosted", "ensemble", "ensemble_merged",
                   "ensemble_with_all"):
        assert results[method].between(0, 1).all()
    with duckdb.connect(str(db), read_only=True) as con:
        report = con.execute("SELECT dataset, ensemble, ensemble_merged, ensemble_with_all "
                             "FROM accuracy_report").fetchall()
    assert [d for d, *_ in report] == sorted(counts) + ["MEAN"]
    assert abs(report[-1][1] - results["ensemble"].mean()) < 1e-9
    from grouplora.ml.ensemble import Ensemble
    ens = Ensemble.load(project / "var" / "storage" / "ensemble" / "current" / "ensemble.json")
    assert set(ens.weights) == set(counts) and all((ens.root / a.path).is_dir() for a in ens.adapters)
    # the served ensemble: the group adapters and their kept rounds (+ θ0, the ridge rounds' reference), never the
    # all-datasets adapter unless EnsembleSettings.include_all; every dataset has a weight > 0 on its own group
    assert spec["baseline"]["key"] not in {a.name for a in ens.adapters}
    group_of = {m: g["key"] for g in spec["groups"] for m in g["members"]}
    served = {a.name for a in ens.adapters}
    assert all(any(a > 0 for a in w.values()) and all(k in served and k.startswith(group_of[d]) for k in w)
               for d, w in ens.weights.items())
    info = json.loads((project / "var" / "storage" / "ensemble" / "current.json").read_text())
    costs = info["method_costs"]
    adapters = project / "var" / "storage" / "adapters"
    group_flops = sum(json.loads((adapters / f"{g['key']}.result.json").read_text())["flops"] for g in spec["groups"])
    assert costs["ensemble"]["flops"] == group_flops + sum(r["flops"] for b in info["boosting"].values()
                                                           for r in b["rounds"])
    assert costs["ensemble_with_all"]["flops"] > costs["ensemble"]["flops"] and costs["zero_shot"]["steps"] == 0

    # registered in MLflow: the first version is the challenger and, with no champion before it, the champion
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'var' / 'mlflow' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("grouplora-ensemble", "challenger").version) == "1"
    assert str(client.get_model_version_by_alias("grouplora-ensemble", "champion").version) == "1"

    checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("dataset"), "dataset_schema")])
    assert checks, "the schema check ran"
    # A rerun with nothing changed resumes: no partition runs again.
    assert run.run_datasets(versions, versions) == ([], {})

    # A pinned λ (settings file) skips the fine-tunes; the estimates use it
    settings_file = project / "settings.yaml"
    settings_file.write_text("estimation: {lam: 0.03}\n")
    os.environ["GROUPLORA_SETTINGS"] = str(settings_file)
    try:
        run.run_suite(executor="in_process")
    finally:
        del os.environ["GROUPLORA_SETTINGS"]
    cal = json.loads((project / "var" / "storage" / "calibration" / "features.json").read_text())
    assert cal["source"] == "pinned" and cal["lam"] == 0.03 and cal["runs"] == {} and cal["table"] == []
    est_md = instance.get_latest_materialization_event(dg.AssetKey("subset_estimates")).asset_materialization.metadata
    assert est_md["lam"].value == 0.03 and est_md["lam_source"].value == "pinned"

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
