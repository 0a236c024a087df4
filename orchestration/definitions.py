"""The one Definitions entry point (workspace.yaml loads this module), and the only orchestration module that
imports the asset modules."""


import dagster as dg

from grouplora.assets.adapters import adapter
from grouplora.assets.calibration import lam_calibration, meta_lam_calibration
from grouplora.assets.datasets import dataset, dataset_class_balance, dataset_schema
from grouplora.assets.ensemble import ensemble
from grouplora.assets.estimates import subset_estimates
from grouplora.assets.features import (approximation_error, approximation_error_within_threshold,
                                      meta_gradient_features, theta0_pass)
from grouplora.assets.meta_init import meta_init_adapter
from grouplora.assets.partition import task_partition
from grouplora.assets.registry import champion, champion_gate, registered_ensemble
from grouplora.assets.selection import target_selection
from grouplora.assets.sql_models import build_sql_assets
from grouplora.orchestration.automation import automation_sensor, with_automation
from grouplora.orchestration.jobs import adapter_job, dataset_job, ensemble_job, report_job, selection_job, suite_job
from grouplora.orchestration.resources import make_resources
from grouplora.orchestration.logs import console_logger
from grouplora.orchestration.sensors import dataset_files_sensor, nightly_recheck, stale_runs_sensor


def build_definitions(executor: dg.ExecutorDefinition = dg.multi_or_in_process_executor) -> dg.Definitions:
    """The project's Definitions with `executor` (multiprocess by default, each step in its own process as on a
    cluster; a run may ask for in_process; orchestration.run.ray_job passes the Ray executor)."""
    return dg.Definitions(
        # Automation conditions (orchestration/automation.py) make re-materialization incremental.
        assets=with_automation([dataset, theta0_pass, approximation_error, lam_calibration, subset_estimates,
                                *build_sql_assets(), task_partition, adapter, ensemble, registered_ensemble, champion,
                                meta_init_adapter, meta_gradient_features, meta_lam_calibration,
                                target_selection]),
        asset_checks=[dataset_schema, dataset_class_balance, approximation_error_within_threshold, champion_gate],
        jobs=[dataset_job, suite_job, report_job, adapter_job, ensemble_job, selection_job],
        sensors=[dataset_files_sensor, automation_sensor, stale_runs_sensor],
        schedules=[nightly_recheck],
        # Locations resolve from GROUPLORA_* when a run uses them, not here: loading defs binds no project. The
        # settings are the project's settings file's ($GROUPLORA_SETTINGS) as of now: the launchpad's defaults.
        resources=make_resources(),
        executor=executor,
        # Dagster's console logger; `grouplora run` asks it for one line per record (orchestration/logs.py).
        loggers={"console": console_logger},
    )


defs = build_definitions()
