"""Dataset assets: one partition per dataset file. Validate, normalize, write Parquet atomically, register in DuckDB."""


import time
import warnings

import dagster as dg
import pandas as pd

from grouplora.ml.data_format import COLUMNS, SPLITS, dataset_card, load_dataset, validate_name
from grouplora.ml.hashing import sha256_file
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.resources import BaseModelResource, DatasetSourceResource, WarehouseResource
from grouplora.orchestration.store import DATASETS, ArtifactStore


# Partitioned asset checks are a Dagster preview feature; we use it knowingly (a check per dataset partition).
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)


@dg.asset(
    partitions_def=dataset_partitions,
    group_name="data",
    kinds={"parquet", "duckdb"},
    code_version="1",
    description="One dataset, validated and normalized (example_id, text, text_pair, label, label_id, split, prompt).",
)
def dataset(context: dg.AssetExecutionContext, sources: DatasetSourceResource, store: ArtifactStore,
            warehouse: WarehouseResource, base_model: BaseModelResource) -> dg.MaterializeResult:
    name = validate_name(context.partition_key)
    files = sources.files()
    if name not in files:
        raise dg.Failure(f"dataset {name!r} has no file in {sources.root()} (removed?)")
    path, config = files[name], sources.config().for_dataset(name)
    start = time.perf_counter()
    # Label words are checked against the real tokenizer here, before anything is written.
    df = load_dataset(path, config, seed=sources.seed, first_token=base_model.first_token)
    card = dataset_card(df, config, sha256_file(path))
    store.write_dataset(name, df, card)
    warehouse.register_parquet("datasets", store.parquet_glob(DATASETS))
    counts = df.groupby(["split", "label"]).size().unstack(fill_value=0)
    context.log.info(f"{name}: {len(df)} rows from {path.name} in {time.perf_counter() - start:.2f}s")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(df),
            "source_file": str(path),
            "task_type": config.task_type,
            "classes": card["classes"],
            "label_words": card["label_words"],
            "counts": dg.MetadataValue.md(counts.to_markdown()),
            **{f"rows_{s}": card["counts"][s] for s in SPLITS},
            "example_prompt": dg.MetadataValue.text(df["prompt"].iloc[0]),
        },
        data_version=dg.DataVersion(sources.version(name)),
    )


@dg.asset_check(asset=dataset, partitions_def=dataset_partitions, blocking=True,
                description="The Parquet file has the canonical columns, integer label ids and known splits.")
def dataset_schema(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
    df = store.rows(context.partition_key)
    problems = [f"missing column {c}" for c in COLUMNS if c not in df.columns]
    if not problems:
        if not pd.api.types.is_integer_dtype(df["label_id"]):
            problems.append("label_id is not integer")
        if not set(df["split"]) <= set(SPLITS):
            problems.append(f"unknown splits {sorted(set(df['split']) - set(SPLITS))}")
        if df["example_id"].duplicated().any():
            problems.append("duplicate example_id")
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": problems, "rows": len(df)})


@dg.asset_check(asset=dataset, partitions_def=dataset_partitions,
                description="Every class has at least 5% of the train rows (a warning, not a failure).")
def dataset_class_balance(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
    shares = store.rows(context.partition_key, "train", ["label"])["label"].value_counts(normalize=True)
    smallest = float(shares.min()) if len(shares) else 0.0
    return dg.AssetCheckResult(passed=smallest >= 0.05, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"min_class_share": round(smallest, 4),
                                         "shares": {k: round(float(v), 4) for k, v in shares.items()}})
