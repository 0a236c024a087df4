"""Dataset assets: one partition per dataset file. Validate, normalize, write Parquet atomically, register in DuckDB."""


import time
import warnings

import dagster as dg
import pandas as pd

from grouplora.ml.atomic import write_json, write_parquet
from grouplora.ml.data_format import COLUMNS, SPLITS, dataset_card, file_hash, load_dataset, validate_name
from grouplora.orchestration.resources import (BaseModelResource, DatasetSourceResource, StorageResource,
                                               WarehouseResource)

dataset_partitions = dg.DynamicPartitionsDefinition(name="datasets")


def current_datasets(context: dg.AssetExecutionContext, storage: StorageResource, kind: str = "features") -> list[str]:
    """Datasets that are registered partitions and have a `kind` artifact in storage (a removed dataset drops out)."""
    registered = set(context.instance.get_dynamic_partitions(dataset_partitions.name))
    have = {p.stem for p in storage.folder(kind).glob("*.parquet")}
    missing = sorted(registered - have)
    if missing:
        context.log.warning(f"no {kind!r} artifact yet for {missing}: left out of this step")
    return sorted(registered & have)


# Partitioned asset checks are a Dagster preview feature; we use it knowingly (a check per dataset partition).
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)


@dg.asset(
    partitions_def=dataset_partitions,
    group_name="data",
    kinds={"parquet", "duckdb"},
    code_version="1",
    description="One dataset, validated and normalized (example_id, text, text_pair, label, label_id, split, prompt).",
)
def dataset(context: dg.AssetExecutionContext, sources: DatasetSourceResource, storage: StorageResource,
            warehouse: WarehouseResource, base_model: BaseModelResource) -> dg.MaterializeResult:
    name = validate_name(context.partition_key)
    files = sources.files()
    if name not in files:
        raise dg.Failure(f"dataset {name!r} has no file in {sources.folder} (removed?)")
    path, config = files[name], sources.config().for_dataset(name)
    start = time.perf_counter()
    # Label words are checked against the real tokenizer here, before anything is written.
    df = load_dataset(path, config, seed=sources.seed, first_token=base_model.first_token)
    card = dataset_card(df, config, file_hash(path))
    write_parquet(df, storage.path("datasets", name))
    write_json(card, storage.path("datasets", name, ".json"))
    warehouse.register_parquet("datasets", storage.glob("datasets"))
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
def dataset_schema(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    df = pd.read_parquet(storage.path("datasets", context.partition_key))
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
def dataset_class_balance(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    df = pd.read_parquet(storage.path("datasets", context.partition_key), columns=["label", "split"])
    shares = df[df["split"] == "train"]["label"].value_counts(normalize=True)
    smallest = float(shares.min()) if len(shares) else 0.0
    return dg.AssetCheckResult(passed=smallest >= 0.05, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"min_class_share": round(smallest, 4),
                                         "shares": {k: round(float(v), 4) for k, v in shares.items()}})
