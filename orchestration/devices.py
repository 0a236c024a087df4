"""Which device a step runs on: what a GPU step asks for, the GPU its executor assigned it, or the CPU.

A GPU asset says so in its decorator: `op_tags=GPU_OP_TAGS, pool=GPU_POOL`. On Ray (`orchestration/executors.py`)
the tag asks for one GPU and the step sees exactly the GPU Ray assigned through CUDA_VISIBLE_DEVICES (torch calls it
cuda:0); a CPU step sees CUDA_VISIBLE_DEVICES="" and so no GPU at all. On one host the pool admits as many GPU steps
at once as it has slots. `resolve_device("auto")` turns that into the torch device the base model loads on.
`log_placement` (a success hook) records where each step ran: host, process, CUDA_VISIBLE_DEVICES, the Ray step key.
"""

from __future__ import annotations

import json
import os
import socket
import time

import dagster as dg

DEVICES = ("auto", "cpu", "cuda")
RAY_CONFIG_TAG = "dagster-ray/config"  # the op tag dagster-ray's executor reads (dagster_ray.configs)
GPU_POOL = "gpu"
GPU_STEP_ENV = "GROUPLORA_GPU_STEP"
# One GPU from Ray, and a runtime_env of its own: dagster-ray takes a step's runtime_env INSTEAD of the executor's
# (which hides the GPUs from CPU steps), so it must not be empty.
GPU_OP_TAGS = {RAY_CONFIG_TAG: json.dumps({"num_gpus": 1, "runtime_env": {"env_vars": {GPU_STEP_ENV: "1"}}})}
PLACEMENT_PREFIX = "placement "  # the log line log_placement writes: this prefix, then JSON


def visible_gpus() -> tuple[str, ...] | None:
    """The GPU ids in CUDA_VISIBLE_DEVICES; () when it is set but empty (no GPU); None when unset (all GPUs)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def check_device(requested: str) -> str:
    """`requested` if it names a device setting (auto, cpu, cuda, cuda:N), else a ValueError."""
    base, _, index = requested.partition(":")
    if base not in DEVICES or (index and not (base == "cuda" and index.isdigit())):
        raise ValueError(f"device {requested!r} is not one of auto, cpu, cuda, cuda:N")
    return requested


def resolve_device(requested: str = "auto") -> str:
    """The torch device for `requested`: 'auto' is the GPU this step was given ('cuda', i.e. the first id in
    CUDA_VISIBLE_DEVICES) when torch can use one, else 'cpu'; 'cpu', 'cuda' and 'cuda:N' pass through."""
    if check_device(requested) != "auto":
        return requested
    if visible_gpus() == ():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def placement() -> dict:
    """Where this process runs: host, pid, process start time, CUDA_VISIBLE_DEVICES (None = unset), the device
    'auto' resolves to, and the step key and job name dagster-ray passes to a step it runs as a Ray job."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": psutil.Process().create_time(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": resolve_device("auto"),
            "ray_step_key": os.environ.get("DAGSTER_RUN_STEP_KEY"),
            "ray_job_name": os.environ.get("DAGSTER_RUN_JOB_NAME")}


@dg.success_hook(name="log_placement")
def log_placement(context: dg.HookContext) -> None:
    """Log where the step ran (one line: PLACEMENT_PREFIX + JSON with the step key and the time it finished)."""
    context.log.info(PLACEMENT_PREFIX + json.dumps({"step_key": context.step_key, "finished": time.time(),
                                                    **placement()}))


def read_placements(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict]:
    """{step key: placement} from a run's log_placement lines."""
    out = {}
    for record in instance.all_logs(run_id):
        msg = record.user_message or ""
        if msg.startswith(PLACEMENT_PREFIX):
            p = json.loads(msg[len(PLACEMENT_PREFIX):])
            out[p["step_key"]] = p
    return out
