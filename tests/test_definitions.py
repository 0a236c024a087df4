"""The Definitions load, bind no project at import, and single assets run directly on small inputs
(`dg.materialize` / `dg.build_asset_context`) against a store in a temporary folder."""

import duckdb
import dagster as dg
import numpy as np
import pandas as pd
import pytest

from grouplora.orchestration.partitions import adapter_partitions, dataset_partitions
from grouplora.orchestration.resources import (BaseModelResource, DatasetSourceResource, WarehouseResource,
                                               make_resources)
from grouplora.orchestration.settings import (EnsembleSettings, GradientSettings, PartitionSettings,
                                              TrainingSettings)
from grouplora.orchestration.store import ArtifactStore


def test_definitions_load_with_every_resource_their_assets_need():
    from grouplora.orchestration.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"dataset", "zero_shot_scores", "gradient_features", "task_partition", "adapter", "ensemble",
            "registered_ensemble", "champion", "meta_init_adapter", "target_selection", "accuracy_report",
            "lam_calibration", "meta_lam_calibration"} <= keys
    # λ is calibrated in the chain: the estimates and the selection read it (lineage shows it)
    assert dg.AssetKey("lam_calibration") in graph.get(dg.AssetKey("subset_estimates")).parent_keys
    assert dg.AssetKey("meta_lam_calibration") in graph.get(dg.AssetKey("target_selection")).parent_keys
    # promotion is its own step, downstream of the registration; the gate is a check on it
    assert dg.AssetKey("registered_ensemble") in graph.get(dg.AssetKey("champion")).parent_keys
    checks = {c.name for c in graph.asset_check_keys}
    assert {"dataset_schema", "dataset_class_balance", "champion_gate"} <= checks
    for job in ("dataset_job", "suite_job", "adapter_job", "ensemble_job", "selection_job", "report_job"):
        assert defs.resolve_job_def(job).name == job


def test_resources_read_the_environment_when_used_not_when_loaded(tmp_path, monkeypatch):
    """The root cause of order-dependent tests: `defs` is cached per process, so its resources must not have
    bound GROUPLORA_* at import."""
    from grouplora.orchestration.definitions import defs

    monkeypatch.setenv("GROUPLORA_HOME", str(tmp_path / "one"))
    monkeypatch.setenv("GROUPLORA_DATASETS", str(tmp_path / "data_one"))
    store = defs.resources["store"]
    assert store.base() == tmp_path / "one" / "storage"
    monkeypatch.setenv("GROUPLORA_HOME", str(tmp_path / "two"))
    monkeypatch.setenv("GROUPLORA_DATASETS", str(tmp_path / "data_two"))
    monkeypatch.setenv("GROUPLORA_BASE_MODEL", "tiny")
    assert store.base() == tmp_path / "two" / "storage"
    assert defs.resources["sources"].root() == tmp_path / "data_two"
    assert defs.resources["warehouse"].file() == tmp_path / "two" / "warehouse.duckdb"
    assert defs.resources["base_model"].model_name() == "tiny"
    assert make_resources()["mlflow_tracking"].uri() == f"sqlite:///{tmp_path / 'two' / 'mlflow' / 'mlflow.db'}"


def test_settings_are_typed_and_bounded():
    with pytest.raises(ValueError, match="method"):
        PartitionSettings(method="kmeans")  # it used to run spectral silently
    with pytest.raises(ValueError, match="boost_mode"):
        EnsembleSettings(boost_mode="fancy")
    with pytest.raises(ValueError, match="normalize"):
        PartitionSettings(normalize="zscore")
    with pytest.raises(ValueError, match="epochs"):
        TrainingSettings(epochs=0)
    with pytest.raises(ValueError, match="d must be"):
        GradientSettings(d=0)
    # the training defaults are TrainConfig's: one source of truth, and what the pipeline has always used
    from grouplora.ml.training import TrainConfig

    assert TrainingSettings().config() == TrainConfig()
    t = TrainingSettings()
    assert (t.lr, t.epochs, t.max_length, t.batch_size, t.warmup_ratio) == (1e-3, 2, 160, 8, 0.1)


def test_store_validates_names_and_reads_cards(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "storage"))
    rows = pd.DataFrame({"prompt": ["a", "b", "c"], "label_id": [0, 1, 0], "split": ["train", "test", "train"]})
    store.write_dataset("toy", rows, {"label_words": [" no", " yes"]})
    assert store.card("toy") == {"label_words": [" no", " yes"]}
    assert store.rows("toy", "train", ["prompt"])["prompt"].tolist() == ["a", "c"]
    assert store.stored("datasets") == ["toy"]
    for bad in ("../etc", "Toy", "a/b", ""):
        with pytest.raises(ValueError):
            store.card(bad)
    with pytest.raises(dg.Failure, match="materialize task_partition"):
        store.partition()


def _resources(tmp_path, folder):
    return {"sources": DatasetSourceResource(folder=str(folder)), "store": ArtifactStore(root=str(tmp_path / "storage")),
            "warehouse": WarehouseResource(path=str(tmp_path / "warehouse.duckdb")),
            "base_model": BaseModelResource(name="tiny")}


def test_dataset_and_the_theta0_pass_materialize_directly(tmp_path, make_folder):
    """dataset, then theta0_pass: zero_shot_scores and gradient_features from one features pass (+ test scored
    alone). The zero-shot scores equal a separate zero-shot forward of the bare base on every split, and the
    process-wide cached base is left without LoRA layers (the next step in this process reuses it)."""
    from grouplora.assets.datasets import dataset, dataset_class_balance, dataset_schema
    from grouplora.assets.features import theta0_pass
    from grouplora.ml.model import label_token_ids
    from grouplora.ml.scoring import predict_logprobs

    folder = make_folder(tmp_path / "datasets")
    resources = _resources(tmp_path, folder) | {"gradient_settings": GradientSettings(d=16, max_tokens=40)}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(dataset_partitions.name, ["reviews"])
        result = dg.materialize([dataset, theta0_pass, dataset_schema, dataset_class_balance],
                                partition_key="reviews", resources=resources, instance=instance)
        assert result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {"dataset_schema": True, "dataset_class_balance": True}
        version = instance.get_latest_data_version_record(dg.AssetKey("dataset"), partition_key="reviews")
        assert version is not None
        done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert done == {"dataset", "zero_shot_scores", "gradient_features"}
        assert len([e for e in result.all_events if e.is_step_success]) == 4  # dataset, 2 checks, ONE pass
    store = resources["store"]
    assert len(store.rows("reviews")) == 24 and store.card("reviews")["classes"] == ["pos", "neg"]  # the yaml's order
    scores = store.zero_shot("reviews")
    assert len(scores) == 24 and set(scores["split"]) == {"train", "validation", "test"}
    model, tok = resources["base_model"].load()
    assert not any("lora" in n for n, _ in model.named_modules())  # the pass took its LoRA layers off again
    rows = store.rows("reviews")
    want = predict_logprobs(model, tok, rows["prompt"].tolist(),
                            label_token_ids(tok, store.card("reviews")["label_words"]), batch_size=1)
    assert list(scores["example_id"]) == list(rows["example_id"])
    np.testing.assert_allclose(np.stack(scores["logprobs"].to_numpy()), want, atol=1e-4)
    n_pass = int(rows["split"].isin(["train", "validation"]).sum())
    frame, X, side = store.read_features(["reviews"])
    assert X.shape == (n_pass, 16) and set(frame["split"]) == {"train", "validation"} and np.isfinite(X).all()
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM zero_shot_scores").fetchone()[0] == 24
        assert con.execute("SELECT count(*) FROM gradient_features").fetchone()[0] == n_pass


def _partition_of_an_in_memory_affinity(tmp_path, make_folder, base_model: BaseModelResource) -> tuple[dict, set, dict]:
    """task_partition on a hand-made subset_affinity table with two clear clusters: {facts, parity} and {reviews}.
    Returns (the partition spec, the adapter partitions registered, the asset's metadata)."""
    from grouplora.assets.partition import task_partition

    folder = make_folder(tmp_path / "datasets")
    resources = _resources(tmp_path, folder)
    names = ["facts", "parity", "reviews"]
    close = {("facts", "parity"), ("parity", "facts")}
    affinity = pd.DataFrame([{"target": t, "source": s,
                           "affinity_neg_loss": -0.1 if t == s or (t, s) in close else -1.0,
                           "affinity_accuracy": 0.5} for t in names for s in names])
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        con.register("affinity", affinity)
        con.execute("CREATE OR REPLACE TABLE subset_affinity AS SELECT * FROM affinity")
    with dg.instance_for_test() as instance:
        context = dg.build_asset_context(instance=instance)
        result = task_partition(context, store=resources["store"], warehouse=resources["warehouse"],
                                sources=resources["sources"], partition_settings=PartitionSettings(m=2, normalize="none"),
                                training_settings=TrainingSettings(), base_model=base_model)
        registered = set(instance.get_dynamic_partitions(adapter_partitions.name))
    return resources["store"].partition(), registered, result.metadata


def test_task_partition_groups_an_in_memory_affinity_directly(tmp_path, make_folder):
    spec, registered, metadata = _partition_of_an_in_memory_affinity(tmp_path, make_folder,
                                                                     BaseModelResource(name="tiny", device="cpu"))
    assert sorted(sorted(g["members"]) for g in spec["groups"]) == [["facts", "parity"], ["reviews"]]
    keys = {g["key"] for g in spec["groups"]} | {spec["baseline"]["key"]}
    assert registered == keys and set(metadata["new_adapter_keys"]) == keys
    store = ArtifactStore(root=str(tmp_path / "storage"))
    for key in keys:
        assert store.adapter_spec(key)["training"] == TrainingSettings().fingerprint()
        assert store.adapter_spec(key)["numerics"] == "float32-cpu"


def test_adapter_keys_change_with_the_dtype_and_the_device_type_only(tmp_path, make_folder):
    """An adapter trained in bf16 (or on a GPU) is another result: another key, so it is trained, not reused.
    Which GPU does not change it."""
    def keys(case: str, **model) -> list[str]:
        spec, _, _ = _partition_of_an_in_memory_affinity(tmp_path / case, make_folder,
                                                          BaseModelResource(name="tiny", **model))
        return [g["key"] for g in spec["groups"]] + [spec["baseline"]["key"]]

    fp32 = keys("a", dtype="float32", device="cpu")
    assert keys("b", dtype="float32", device="cpu") == fp32  # stable
    bf16 = keys("c", dtype="bfloat16", device="cpu")
    cuda = keys("d", dtype="float32", device="cuda")
    assert not set(bf16) & set(fp32) and not set(cuda) & set(fp32) and not set(cuda) & set(bf16)
    assert keys("e", dtype="float32", device="cuda:1") == cuda
