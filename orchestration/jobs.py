"""Jobs: per-dataset work (one run per partition), the suite-wide assets, adapters, the ensemble, selection.

Selected by asset key, so this module imports no asset module (definitions.py is the only one that does)."""


import dagster as dg

from grouplora.orchestration.partitions import adapter_partitions, dataset_partitions

# The per-dataset assets, in the order the data flows; the CLI runner checks them for currency in this order.
PER_DATASET_ASSETS = ["dataset", "zero_shot_scores", "gradient_features"]

dataset_job = dg.define_asset_job(
    "dataset_job",
    selection=dg.AssetSelection.assets(*PER_DATASET_ASSETS),
    partitions_def=dataset_partitions,
    description="Validate one dataset, score it zero-shot, and take its gradient features.",
)

suite_job = dg.define_asset_job(
    "suite_job",
    selection=(dg.AssetSelection.assets("approximation_error", "lam_calibration", "subset_estimates", "task_partition")
               | dg.AssetSelection.groups("sql")) - dg.AssetSelection.assets("ensemble").downstream(),
    description="Suite-wide assets: approximation error, λ calibration, subset estimates, SQL affinity tables, the "
                "partition.",
)

adapter_job = dg.define_asset_job(
    "adapter_job",
    selection=dg.AssetSelection.assets("adapter"),
    partitions_def=adapter_partitions,
    description="Train one adapter (a group's, or the all-datasets baseline).",
)

ensemble_job = dg.define_asset_job(
    "ensemble_job",
    selection=dg.AssetSelection.assets("ensemble").downstream(),
    description="Fit the per-dataset ensemble, boost, report, register the ensemble in MLflow and promote it "
                "to champion if it wins.",
)

# Partitioned by dataset = the target for target_selection; the runner (orchestration/run.py: run_selection) runs
# it step by step with an asset selection: the meta-init adapter once, meta features per dataset, λ at the
# meta-init once, then the target.
selection_job = dg.define_asset_job(
    "selection_job",
    selection=dg.AssetSelection.assets("meta_init_adapter", "meta_gradient_features", "meta_lam_calibration",
                                       "target_selection"),
    partitions_def=dataset_partitions,
    description="Choose auxiliary datasets for a target: the meta-init adapter, meta-init gradient features, "
                "λ calibrated at the meta-init, target_selection for the partition's target.",
)

report_job = dg.define_asset_job("report_job", selection=dg.AssetSelection.groups("sql"),
                                 description="Rebuild the SQL models (affinity tables, reports) in DuckDB.")
