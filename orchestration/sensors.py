"""Sensors: the dataset folder is the source of truth; new, changed and removed files drive the partitions."""


import json

import dagster as dg

from grouplora.ml.data_format import DatasetError
from grouplora.orchestration.freshness import dataset_is_stale, stale_datasets
from grouplora.orchestration.jobs import dataset_job, suite_job
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.resources import DatasetSourceResource, MlflowResource
from grouplora.orchestration.settings import EnsembleSettings


@dg.sensor(jobs=[dataset_job, suite_job], minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Registers new or changed dataset files (by content hash and settings) and requests their runs; "
                       "when files were removed, deletes their partitions and requests a suite run without them.")
def dataset_files_sensor(context: dg.SensorEvaluationContext, sources: DatasetSourceResource) -> dg.SensorResult | dg.SkipReason:
    try:
        files, unusable = sources.scan()
        current = {name: sources.version(name) for name in files}
    except (DatasetError, ValueError) as e:  # an unreadable folder or a bad config: say so, change nothing
        return dg.SkipReason(f"dataset folder not usable: {e}")
    for problem in unusable:  # a bad name, a symlink out of the folder: that file is left out, the others go on
        context.log.warning(f"left out: {problem}")
    seen = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(dataset_partitions.name))
    added, removed = sorted(set(current) - known), sorted(known - set(current))
    # Changed since the last tick, and not already materialized at this version (e.g. by `grouplora run`).
    changed = sorted(n for n, v in current.items()
                     if seen.get(n) != v and dataset_is_stale(context.instance, n, v))
    requests = []
    if added:
        requests.append(dataset_partitions.build_add_request(added))
    if removed:
        requests.append(dataset_partitions.build_delete_request(removed))
    if changed or added or removed:
        context.log.info(f"added {added}, changed {sorted(set(changed) - set(added))}, removed {removed}")
    runs = [dg.RunRequest(job_name=dataset_job.name, partition_key=n, run_key=f"{n}:{current[n]}") for n in changed]
    if removed:
        # A deleted partition is no asset update, so automation would not notice: re-run the suite without it
        # (the daemon applies the partition requests before it launches runs). Its downstream follows by automation.
        runs.append(dg.RunRequest(job_name=suite_job.name, run_key="suite:-" + ",".join(removed) + ":" +
                                  ",".join(f"{n}={v}" for n, v in sorted(current.items()))))
    return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=requests,
                           cursor=json.dumps(current, sort_keys=True))


@dg.schedule(job=dataset_job, cron_schedule="0 3 * * *", default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Nightly re-check: re-materializes every registered dataset partition whose file no longer "
                         "matches its last materialized version (a change the sensor missed); automation does the rest.")
def nightly_recheck(context: dg.ScheduleEvaluationContext, sources: DatasetSourceResource):
    try:
        current = {name: sources.version(name) for name in sources.files()}
    except (DatasetError, ValueError) as e:
        return dg.SkipReason(f"dataset folder not usable: {e}")
    stale = stale_datasets(context.instance, current)
    if not stale:
        return dg.SkipReason("every registered dataset partition is current")
    return [dg.RunRequest(partition_key=n, run_key=f"nightly:{n}:{current[n]}") for n in stale]


@dg.sensor(minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.RUNNING,
           description="After a crash: marks failed the runs whose process is gone (a killed run worker, a killed "
                       "`grouplora run`), closes their MLflow runs as KILLED and sets aside half-registered model "
                       "versions (orchestration/recovery.py). Requests no runs.")
def stale_runs_sensor(context: dg.SensorEvaluationContext, mlflow_tracking: MlflowResource,
                      ensemble_settings: EnsembleSettings) -> dg.SkipReason:
    from grouplora.orchestration.recovery import recover
    from grouplora.orchestration.registry import use_tracking

    # local_workers: the daemon started here launches run workers on this machine; their recorded pid is the owner
    report = recover(context.instance, use_tracking(mlflow_tracking.uri()),
                     registered_name=ensemble_settings.registered_name, local_workers=True)
    for line in report.lines():
        context.log.warning(line)
    return dg.SkipReason("; ".join(report.lines()) or "nothing left behind by a crashed process")
