"""Incremental re-materialization with Dagster's declarative automation (the assets' modules stay untouched).

`with_automation(assets)` returns the same assets with an `AutomationCondition` each; the automation sensor
(`automation_sensor`, running by default) evaluates them in the daemon that `dagster dev` / `grouplora ui` starts:

- per-dataset assets (`zero_shot_scores`, `gradient_features`): eager, partition by partition, when their
  `dataset` partition updates (the sensor re-materializes a dataset when its file's content hash changes);
- suite assets (`approximation_error`, `lam_calibration`, `subset_estimates`, the SQL models, `task_partition`):
  eager after any upstream update, never while an upstream is in progress, and not while per-dataset work is
  still pending;
- `adapter`: a partition runs when it is missing (a new key that `task_partition` registered). Keys are content
  hashes of members + data versions + training settings, so an unchanged group keeps its key and is not retrained;
- `ensemble`: after adapter partitions update (and all of them exist); `registered_ensemble`: after the ensemble;
  `champion` (the promotion step): after the registration.

Removing a dataset file is not an update of any asset: `dataset_files_sensor` deletes the partition and requests a
`suite_job` run, after which the conditions above carry on. `nightly_recheck` re-checks the folder every night.
"""

from collections.abc import Iterable

import dagster as dg

AC = dg.AutomationCondition

PER_DATASET = {"zero_shot_scores", "gradient_features"}
SUITE = {"approximation_error", "lam_calibration", "subset_estimates", "task_partition"}  # + every asset of group "sql"


def _dataset_work_pending() -> AC:
    """True while any per-dataset asset partition is missing, in progress, or behind its `dataset` partition
    (the dataset updated since it last did): the suite waits for all per-dataset work to finish."""
    behind = AC.any_deps_updated().since(AC.newly_updated()).with_label("behind_its_dataset")
    pending = (behind | AC.missing() | AC.in_progress()).with_label("pending")
    return (AC.asset_matches("zero_shot_scores", pending) | AC.asset_matches("gradient_features", pending)
            ).with_label("per_dataset_work_pending")


def per_dataset_condition() -> AC:
    return AC.eager()


def suite_condition() -> AC:
    return (AC.eager() & ~_dataset_work_pending()).with_label("eager_after_datasets")


def adapter_condition() -> AC:
    # `missing` (not `eager`): a dataset update must not retrain an adapter whose key (content hash) is unchanged.
    return (AC.on_missing() & ~AC.any_deps_in_progress() & ~AC.in_progress()).with_label("on_new_key")


def ensemble_condition() -> AC:
    adapters_updated = AC.any_deps_updated().allow(dg.AssetSelection.assets("adapter"))
    return (
        adapters_updated.since_last_handled()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("after_adapters")


def condition_for(key: str, group: str | None) -> AC | None:
    if key in PER_DATASET:
        return per_dataset_condition()
    if key in SUITE or group == "sql":
        return suite_condition()
    if key == "adapter":
        return adapter_condition()
    if key == "ensemble":
        return ensemble_condition()
    if key in ("registered_ensemble", "champion"):
        return AC.eager()
    return None  # `dataset`: driven by the sensor (file content hashes), not by automation


def with_automation(assets: Iterable[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    def attach(spec: dg.AssetSpec) -> dg.AssetSpec:
        condition = condition_for(spec.key.to_user_string(), spec.group_name)
        return spec if condition is None else spec.replace_attributes(automation_condition=condition)

    return list(dg.map_asset_specs(attach, list(assets)))


automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates the assets' automation conditions (incremental re-materialization).",
)
