"""The one Definitions entry point (workspace.yaml loads this module)."""


import dagster as dg

from grouplora.assets.datasets import dataset, dataset_class_balance, dataset_schema
from grouplora.assets.sql_models import build_sql_assets
from grouplora.assets.zero_shot import zero_shot_scores
from grouplora.orchestration import settings
from grouplora.orchestration.jobs import dataset_job, report_job
from grouplora.orchestration.resources import (BaseModelResource, DatasetSourceResource, StorageResource,
                                               WarehouseResource)
from grouplora.orchestration.sensors import dataset_files_sensor


def make_resources() -> dict[str, dg.ConfigurableResource]:
    home = settings.home()
    return {
        "sources": DatasetSourceResource(folder=str(settings.datasets_folder())),
        "storage": StorageResource(root=str(home / "storage")),
        "warehouse": WarehouseResource(path=str(home / "warehouse.duckdb")),
        "base_model": BaseModelResource(name=settings.base_model_name()),
    }


defs = dg.Definitions(
    assets=[dataset, zero_shot_scores, *build_sql_assets()],
    asset_checks=[dataset_schema, dataset_class_balance],
    jobs=[dataset_job, report_job],
    sensors=[dataset_files_sensor],
    resources=make_resources(),
    executor=dg.multiprocess_executor.configured({"max_concurrent": 2}),
)
