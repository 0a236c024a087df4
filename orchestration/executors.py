"""Executors beyond one process per step on one host: Ray through dagster-ray, and the GPU pool.

GPU steps (zero-shot scoring, gradient features, adapter training, ensemble scoring) carry `GPU_OP_TAGS` and
`pool=GPU_POOL` (`orchestration/devices.py`) in their asset decorator; every other step is a CPU step and carries
nothing.

* Ray (`pip install grouplora[ray]`): `ray_executor()` submits each step as a Ray job. dagster-ray reads the op
  tag `dagster-ray/config`: a GPU step asks for one GPU, and Ray sets that step's CUDA_VISIBLE_DEVICES to the GPU
  it assigned (the base model loads on it: `devices.resolve_device("auto")`). A CPU step asks for none and runs
  with the executor's runtime_env, CUDA_VISIBLE_DEVICES="", so it sees no GPU even on a GPU node (Ray leaves the
  variable alone for a job without GPUs). A step's own runtime_env replaces the executor's (dagster-ray does not
  merge them), which is how GPU steps escape the "" : their runtime_env names GPU_STEP_ENV instead.
* One host, multiprocess executor: the Dagster pool `GPU_POOL` admits at most `set_gpu_pool_limit(instance, n)`
  GPU steps at once (op granularity), so n GPUs are never asked to hold more than n steps' models.
"""

from __future__ import annotations

import os
from typing import Sequence

import dagster as dg

from grouplora.orchestration.devices import GPU_POOL

CPU_RUNTIME_ENV = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
# What a step process needs from the launching process's environment (each step re-imports the definitions).
FORWARDED_ENV = ("GROUPLORA_HOME", "GROUPLORA_DATASETS", "GROUPLORA_BASE_MODEL", "GROUPLORA_CACHE",
                 "GROUPLORA_SETTINGS", "GROUPLORA_DEVICE", "GROUPLORA_DTYPE", "DAGSTER_HOME", "MLFLOW_TRACKING_URI",
                 "MLFLOW_DISABLE_TELEMETRY", "HF_HOME")


def ray_executor(address: str | None = None, env_vars: Sequence[str] = FORWARDED_ENV) -> dg.ExecutorDefinition:
    """dagster-ray's executor for the Ray cluster at `address` (its dashboard/job API, e.g. http://head:8265;
    default $RAY_ADDRESS), forwarding `env_vars` from the launching process to every step."""
    try:
        from dagster_ray import ray_executor as dagster_ray_executor
    except ImportError as e:
        raise ImportError("the Ray executor needs the ray extra: pip install 'grouplora[ray]'") from e
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no Ray address: pass one or set RAY_ADDRESS (the head's job API, http://HOST:8265)")
    return dagster_ray_executor.configured(
        {"ray": {"address": address, "env_vars": list(env_vars), "runtime_env": CPU_RUNTIME_ENV}}, name="ray")


def set_gpu_pool_limit(instance: dg.DagsterInstance, n_gpus: int) -> None:
    """At most `n_gpus` steps of the GPU pool run at once on this instance (multiprocess executor, one host)."""
    if n_gpus < 1:
        raise ValueError(f"the GPU pool needs a limit >= 1, got {n_gpus}")
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, n_gpus)
