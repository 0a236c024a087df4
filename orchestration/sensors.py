"""Sensors: the dataset folder is the source of truth; new, changed and removed files drive the partitions."""


import json

import dagster as dg

from grouplora.assets.datasets import dataset_partitions
from grouplora.ml.data_format import DatasetError
from grouplora.orchestration.jobs import dataset_job
from grouplora.orchestration.resources import DatasetSourceResource


@dg.sensor(job=dataset_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Registers new or changed dataset files (by content hash and settings) and requests their runs.")
def dataset_files_sensor(context: dg.SensorEvaluationContext, sources: DatasetSourceResource) -> dg.SensorResult | dg.SkipReason:
    try:
        current = {name: sources.version(name) for name in sources.files()}
    except (DatasetError, ValueError) as e:  # a bad file name or config: say so, change nothing
        return dg.SkipReason(f"dataset folder not usable: {e}")
    seen = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(dataset_partitions.name))
    added, removed = sorted(set(current) - known), sorted(known - set(current))
    changed = sorted(n for n, v in current.items() if seen.get(n) != v)
    requests = []
    if added:
        requests.append(dataset_partitions.build_add_request(added))
    if removed:
        requests.append(dataset_partitions.build_delete_request(removed))
    if changed or added or removed:
        context.log.info(f"added {added}, changed {sorted(set(changed) - set(added))}, removed {removed}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=n, run_key=f"{n}:{current[n]}") for n in changed],
        dynamic_partitions_requests=requests,
        cursor=json.dumps(current, sort_keys=True),
    )
