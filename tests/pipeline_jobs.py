"""The per-dataset chain (dataset -> zero_shot_scores, gradient_features) of the REAL assets as a job on a chosen
executor, for tests that run it out of process: every step process re-imports this module by name.

The GPU assets carry GPU_OP_TAGS and the GPU pool in their own decorators (orchestration/devices.py).

Run one partition: python tests/pipeline_jobs.py PARTITION EXECUTOR [RAY_ADDRESS]  (prints {"run_id", "success"})
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dagster as dg

from grouplora.assets.datasets import dataset
from grouplora.assets.features import theta0_pass
from grouplora.orchestration.devices import log_placement
from grouplora.orchestration.executors import ray_executor
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.resources import make_resources

JOB = "chain_job"
GPU_STEPS = ("theta0_pass",)  # zero_shot_scores and gradient_features: one step
CPU_STEPS = ("dataset",)


def chain_job(executor: str = "multiprocess", address: str | None = None) -> dg.JobDefinition:
    executor_def = ray_executor(address) if executor == "ray" else dg.multiprocess_executor
    assets = [dataset, theta0_pass]
    job = dg.define_asset_job(JOB, selection=dg.AssetSelection.assets(*assets), partitions_def=dataset_partitions,
                              executor_def=executor_def, hooks={log_placement})
    return dg.Definitions(assets=assets, jobs=[job], resources=make_resources()).resolve_job_def(JOB)


def run_partition(partition: str, executor: str, address: str | None = None) -> dict:
    job = dg.build_reconstructable_job(__name__ if __name__ != "__main__" else Path(__file__).stem, "chain_job",
                                       reconstructable_kwargs={"executor": executor, "address": address},
                                       reconstructor_working_directory=str(Path(__file__).parent))
    with dg.DagsterInstance.get() as instance:
        with dg.execute_job(job, instance, tags={"dagster/partition": partition}) as result:
            return {"run_id": result.run_id, "success": result.success}


if __name__ == "__main__":
    print(json.dumps(run_partition(*sys.argv[1:])))
