"""The per-dataset chain (dataset -> zero_shot_scores, gradient_features) of the REAL assets as a job on a chosen
executor, for tests that run it out of process: every step process re-imports this module by name.

The GPU assets get GPU_OP_TAGS and the GPU pool here (`as_gpu_step`) because the asset modules do not carry
them yet; once their decorators say `op_tags=GPU_OP_TAGS, pool=GPU_POOL`, as_gpu_step has nothing left to do.

Run one partition: python tests/pipeline_jobs.py PARTITION EXECUTOR [RAY_ADDRESS]  (prints {"run_id", "success"})
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dagster as dg
from dagster._core.definitions.assets.definition.assets_definition import AssetsDefinition
from dagster._core.definitions.op_definition import OpDefinition

from grouplora.assets.datasets import dataset
from grouplora.assets.features import gradient_features
from grouplora.assets.zero_shot import zero_shot_scores
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL, log_placement
from grouplora.orchestration.executors import ray_executor
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.resources import make_resources

JOB = "chain_job"
GPU_STEPS = ("zero_shot_scores", "gradient_features")
CPU_STEPS = ("dataset",)


def as_gpu_step(asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """`asset` with its op carrying GPU_OP_TAGS and pool GPU_POOL (what the decorator arguments would give).
    Dagster has no public way to retag an existing asset's op, hence its internal constructors (test only)."""
    op = asset.op
    tagged = OpDefinition.dagster_internal_init(
        compute_fn=op.compute_fn, name=op.name, ins={d.name: dg.In.from_definition(d) for d in op.input_defs},
        outs={d.name: dg.Out.from_definition(d) for d in op.output_defs}, description=op.description,
        config_schema=op.config_schema, required_resource_keys=op.required_resource_keys,
        tags={**op.tags, **GPU_OP_TAGS}, version=None, retry_policy=op.retry_policy, code_version=op._version,
        pool=GPU_POOL)
    return AssetsDefinition.dagster_internal_init(**{**asset.get_attributes_dict(), "node_def": tagged})


def chain_job(executor: str = "multiprocess", address: str | None = None) -> dg.JobDefinition:
    executor_def = ray_executor(address) if executor == "ray" else dg.multiprocess_executor
    assets = [dataset, as_gpu_step(zero_shot_scores), as_gpu_step(gradient_features)]
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
