"""What is current, read from Dagster's own records: the latest materialization of an asset partition and the
data version it recorded (`dataset` records its file's content version as its data version).

This is the one place where the CLI runner (orchestration/run.py) and the sensor and schedule
(orchestration/sensors.py) decide what to skip. The daemon itself uses the automation conditions of
orchestration/automation.py; the CLI runs jobs one after another in its own process and resumes by asking
this module, so a rerun skips what is current. It imports no other grouplora module of the orchestration layer.
"""

from typing import Any

import dagster as dg

from grouplora.orchestration.partitions import dataset_partitions


def latest_materialization(instance: dg.DagsterInstance, asset: str, partition: str | None) -> dg.EventLogRecord | None:
    """The latest materialization of one partition (partition None: of an unpartitioned asset)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=None if partition is None else [partition]),
        limit=1).records
    return records[0] if records else None


def materialized_version(instance: dg.DagsterInstance, asset: str, partition: str) -> str | None:
    """The data version that a partition's last materialization recorded (None if never materialized)."""
    record = latest_materialization(instance, asset, partition)
    if record is None or record.asset_materialization is None:
        return None
    return (record.asset_materialization.tags or {}).get("dagster/data_version")


def newer(record: dg.EventLogRecord | None, *than: dg.EventLogRecord | None) -> bool:
    """record exists and was stored after every one of `than` (None entries: never materialized)."""
    return record is not None and all(t is None or record.storage_id > t.storage_id for t in than)


def holds(record: dg.EventLogRecord | None, expected: dict[str, Any] | None) -> bool:
    """The materialization recorded every expected metadata value (e.g. the settings it ran with); a value it
    did not record never matches, so what ran before a setting was recorded runs again."""
    if not expected:
        return True
    if record is None or record.asset_materialization is None:
        return False
    metadata = record.asset_materialization.metadata
    return all(k in metadata and metadata[k].value == v for k, v in expected.items())


def dataset_is_stale(instance: dg.DagsterInstance, name: str, version: str) -> bool:
    """True unless the `dataset` partition's last materialization holds exactly this file version."""
    return materialized_version(instance, "dataset", name) != version


def stale_datasets(instance: dg.DagsterInstance, current: dict[str, str]) -> list[str]:
    """Registered dataset partitions whose file's version is not the one last materialized (or never was)."""
    registered = set(instance.get_dynamic_partitions(dataset_partitions.name))
    return [n for n in sorted(registered & set(current)) if dataset_is_stale(instance, n, current[n])]


def partition_is_current(instance: dg.DagsterInstance, partition: str, version: str, assets: list[str],
                         expected: dict[str, dict[str, Any]] | None = None) -> bool:
    """True when the dataset partition holds `version` and every later per-dataset asset was built after it,
    recording the `expected` metadata ({asset: {key: value}}: the settings it must have run with)."""
    if dataset_is_stale(instance, partition, version):
        return False
    records = {a: latest_materialization(instance, a, partition) for a in assets}
    return all(newer(records[a], records[assets[0]]) and holds(records[a], (expected or {}).get(a))
               for a in assets[1:])


def meta_init_is_current(instance: dg.DagsterInstance, names: list[str],
                         expected: dict[str, Any] | None = None) -> bool:
    """The meta-init adapter exists, was trained on (at least) `names` and after each one's latest dataset (and
    recorded the `expected` metadata)."""
    record = latest_materialization(instance, "meta_init_adapter", None)
    if record is None or record.asset_materialization is None or not holds(record, expected):
        return False
    trained_on = record.asset_materialization.metadata.get("datasets")
    return (trained_on is not None and set(names) <= set(trained_on.value)
            and newer(record, *(latest_materialization(instance, "dataset", n) for n in names)))


def meta_features_are_current(instance: dg.DagsterInstance, name: str,
                              expected: dict[str, Any] | None = None) -> bool:
    """A dataset's meta_gradient_features were taken after both the meta-init adapter and the dataset (and
    recorded the `expected` metadata)."""
    record = latest_materialization(instance, "meta_gradient_features", name)
    return newer(record, latest_materialization(instance, "meta_init_adapter", None),
                 latest_materialization(instance, "dataset", name)) and holds(record, expected)


def calibration_is_current(instance: dg.DagsterInstance, asset: str, upstream: list[str | tuple[str, str]],
                           expected: dict[str, Any] | None = None) -> bool:
    """A calibration asset was materialized after every upstream (asset, or (asset, partition)) and recorded the
    `expected` metadata (e.g. its λ source)."""
    record = latest_materialization(instance, asset, None)
    ups = [latest_materialization(instance, *u) if isinstance(u, tuple) else latest_materialization(instance, u, None)
           for u in upstream]
    return newer(record, *ups) and all(u is not None for u in ups) and holds(record, expected)


def job_succeeded_after(instance: dg.DagsterInstance, job_name: str, records: list[dg.EventLogRecord | None],
                        resources: dict[str, Any] | None = None) -> bool:
    """The job's latest successful run started after every one of `records` was stored (None entries, never
    materialized, make this False), so it saw all of them, and ran with the `resources` run config (the project's
    settings, resources.settings_run_config) when given."""
    runs = instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.SUCCESS]),
                                    limit=1)
    if not runs or runs[0].start_time is None:
        return False
    if resources is not None and runs[0].dagster_run.run_config.get("resources") != resources:
        return False
    return all(r is not None and r.timestamp < runs[0].start_time for r in records)


def suite_is_current(instance: dg.DagsterInstance, versions: dict[str, str], spec: dict | None,
                     per_dataset_assets: list[str], resources: dict[str, Any] | None = None) -> bool:
    """The suite's last successful run (`suite_job`) partitioned exactly these datasets at these versions
    (`spec`: the stored task partition), under these settings, and started after every one of their per-dataset
    materializations."""
    if not spec or spec.get("datasets") != sorted(versions) or spec.get("versions") != versions:
        return False
    return job_succeeded_after(instance, "suite_job", [latest_materialization(instance, a, n)
                                                       for n in versions for a in per_dataset_assets], resources)


def ensemble_is_current(instance: dg.DagsterInstance, adapter_keys: list[str],
                        resources: dict[str, Any] | None = None) -> bool:
    """The ensemble's last successful run (`ensemble_job`: fit, register, promote) ran under these settings and
    started after the task partition and every one of these adapters was materialized."""
    return job_succeeded_after(instance, "ensemble_job", [latest_materialization(instance, "task_partition", None),
                                                          *(latest_materialization(instance, "adapter", k)
                                                            for k in adapter_keys)], resources)
