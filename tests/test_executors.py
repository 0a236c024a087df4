"""One host, many steps: the device a step resolves to, and the Dagster pool that keeps GPU steps from piling up
on the multiprocess executor (the real per-dataset assets on the tiny model). The Ray executor: test_ray.py."""

from __future__ import annotations

import json
import os
from itertools import combinations
from pathlib import Path

import pytest

from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL, RAY_CONFIG_TAG, resolve_device, visible_gpus
from grouplora.orchestration.executors import ray_executor


def test_device_follows_the_gpus_a_step_was_given(monkeypatch):
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what a CPU step sees under Ray
    assert visible_gpus() == () and resolve_device("auto") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # what Ray gives a GPU step: torch then calls it cuda:0
    assert visible_gpus() == ("1",)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() is None
    assert [resolve_device(d) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda", "cuda:1"]
    for bad in ("gpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(ValueError, match="not one of"):
            resolve_device(bad)


def test_gpu_tags_ask_ray_for_one_gpu_and_an_own_runtime_env(monkeypatch):
    config = json.loads(GPU_OP_TAGS[RAY_CONFIG_TAG])
    assert config["num_gpus"] == 1
    # dagster-ray takes a step's runtime_env INSTEAD of the executor's (CUDA_VISIBLE_DEVICES=""): it must be
    # non-empty, or the GPU step would fall back to the executor's and hide the GPU Ray gave it
    assert config["runtime_env"]["env_vars"] and "CUDA_VISIBLE_DEVICES" not in config["runtime_env"]["env_vars"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises((ImportError, ValueError), match="ray extra|no Ray address"):  # either way, a clear error
        ray_executor(None)


# Every asset that loads the model's weights: a GPU step. The dataset step needs only the tokenizer, and
# task_partition only the base model's settings (its numerics, for the adapter keys).
GPU_ASSETS = {"zero_shot_scores", "gradient_features", "meta_gradient_features", "approximation_error", "adapter",
              "meta_init_adapter", "ensemble", "subset_estimates", "target_selection", "lam_calibration",
              "meta_lam_calibration"}


def test_the_steps_that_load_the_model_ask_for_one_gpu_and_no_other_step_does():
    import dagster as dg

    from grouplora.orchestration.definitions import defs

    seen = {}
    for assets_def in defs.assets:
        if isinstance(assets_def, dg.AssetsDefinition):
            for key in assets_def.keys:
                op = assets_def.op
                seen[key.to_user_string()] = (op.tags.get(RAY_CONFIG_TAG) == GPU_OP_TAGS[RAY_CONFIG_TAG],
                                              op.pool == GPU_POOL, "base_model" in assets_def.required_resource_keys)
    assert GPU_ASSETS <= set(seen) and len(seen) > len(GPU_ASSETS) + 5
    for name, (tagged, pooled, uses_model) in seen.items():
        assert tagged == pooled == (name in GPU_ASSETS), name
        assert not uses_model or name in GPU_ASSETS | {"dataset", "task_partition"}, name


def test_the_cpu_dataset_step_loads_the_tokenizer_and_no_weights(tmp_path, make_folder):
    import dagster as dg

    from grouplora.assets.datasets import dataset
    from grouplora.orchestration import resources as res
    from grouplora.orchestration.store import ArtifactStore

    folder = make_folder(tmp_path / "datasets")
    res._load_model.cache_clear()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["reviews"])
        result = dg.materialize([dataset], partition_key="reviews", instance=instance, resources={
            "sources": res.DatasetSourceResource(folder=str(folder)), "store": ArtifactStore(root=str(tmp_path / "s")),
            "warehouse": res.WarehouseResource(path=str(tmp_path / "w.duckdb")),
            "base_model": res.BaseModelResource(name="tiny")})
    assert result.success and len(ArtifactStore(root=str(tmp_path / "s")).rows("reviews")) == 24
    assert res._load_model.cache_info().currsize == 0  # no model was loaded in this process
    assert res._load_tokenizer.cache_info().currsize >= 1


@pytest.mark.slow
def test_gpu_pool_limits_concurrent_gpu_steps_on_the_multiprocess_executor(plain_project, concurrent_partition_runs):
    """Two partitions' runs at once, each with one GPU step (theta0_pass: zero-shot scores and gradient features
    from one pass) ready after its dataset step; with the GPU pool's limit at 1 (the pool is instance-wide) one
    waits for the other (Dagster says so) and the two never run at once."""
    import dagster as dg

    from grouplora.orchestration.devices import read_placements
    from grouplora.orchestration.executors import set_gpu_pool_limit
    from pipeline_jobs import GPU_STEPS

    dagster_home = Path(os.environ["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    keys = ["reviews", "parity"]
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("datasets", keys)
        set_gpu_pool_limit(instance, 1)
        with pytest.raises(ValueError):
            set_gpu_pool_limit(instance, 0)
    results = concurrent_partition_runs(keys, "multiprocess")
    blocked, spans = [], []
    with dg.DagsterInstance.get() as instance:
        for r in results:
            logs = instance.all_logs(r["run_id"])
            blocked += [e.step_key for e in logs if f"blocked by limit for pool {GPU_POOL}" in (e.user_message or "")]
            placements = read_placements(instance, r["run_id"])
            assert all(placements[s]["ray_step_key"] is None for s in GPU_STEPS)  # multiprocess, not Ray
            # the step's own start and success events: the pool slot is taken before the one and freed after the
            # other (the placement hook runs after success, when the slot may already be the other run's)
            spans += [(st.start_time, st.end_time) for st in instance.get_run_step_stats(r["run_id"])
                      if st.step_key in GPU_STEPS]
    assert set(blocked) <= set(GPU_STEPS) and blocked  # one GPU step had to wait for the other's slot
    assert len(spans) == 2 and all(not (a[0] < b[1] and b[0] < a[1]) for a, b in combinations(spans, 2))
