"""Jobs: per-dataset work (one run per partition) and the suite-wide SQL models."""


import dagster as dg

from grouplora.assets.adapters import adapter
from grouplora.assets.datasets import dataset, dataset_partitions
from grouplora.assets.ensemble import ensemble
from grouplora.assets.estimates import subset_estimates
from grouplora.assets.partition import adapter_partitions, task_partition
from grouplora.assets.features import approximation_error, gradient_features
from grouplora.assets.zero_shot import zero_shot_scores

# The per-dataset assets, in the order the data flows; the CLI runner checks them for currency in this order.
PER_DATASET_ASSETS = [dataset, zero_shot_scores, gradient_features]

dataset_job = dg.define_asset_job(
    "dataset_job",
    selection=dg.AssetSelection.assets(*PER_DATASET_ASSETS),
    partitions_def=dataset_partitions,
    description="Validate one dataset, score it zero-shot, and take its gradient features.",
)

suite_job = dg.define_asset_job(
    "suite_job",
    selection=(dg.AssetSelection.assets(approximation_error, subset_estimates, task_partition)
               | dg.AssetSelection.groups("sql")) - dg.AssetSelection.assets(ensemble).downstream(),
    description="Suite-wide assets: approximation error, subset estimates, SQL affinity tables, the partition.",
)

adapter_job = dg.define_asset_job(
    "adapter_job",
    selection=dg.AssetSelection.assets(adapter),
    partitions_def=adapter_partitions,
    description="Train one adapter (a group's, or the all-datasets baseline).",
)

ensemble_job = dg.define_asset_job(
    "ensemble_job",
    selection=dg.AssetSelection.assets(ensemble).downstream(),
    description="Fit the per-dataset ensemble, boost, report, and register the ensemble in MLflow.",
)

report_job = dg.define_asset_job("report_job", selection=dg.AssetSelection.groups("sql"),
                                 description="Rebuild the SQL models (affinity tables, reports) in DuckDB.")
