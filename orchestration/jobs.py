"""Jobs: per-dataset work (one run per partition) and the suite-wide SQL models."""


import dagster as dg

from grouplora.assets.datasets import dataset, dataset_partitions
from grouplora.assets.zero_shot import zero_shot_scores

dataset_job = dg.define_asset_job(
    "dataset_job",
    selection=dg.AssetSelection.assets(dataset, zero_shot_scores),
    partitions_def=dataset_partitions,
    description="Validate one dataset and score it zero-shot.",
)

report_job = dg.define_asset_job("report_job", selection=dg.AssetSelection.groups("sql"),
                                 description="Rebuild the SQL models (affinity tables, reports) in DuckDB.")
