"""Gradient features: per example, f0 (log-odds of the gold label at θ0) and the projected LoRA gradient of f."""

import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa

from grouplora.ml.approx import SCALES, approximation_errors
from grouplora.ml.features import compute_features
from grouplora.ml.model import label_token_ids, model_fingerprint
from grouplora.ml.plots import line_chart
from grouplora.ml.projection import Projection
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.resources import BaseModelResource, MlflowResource, WarehouseResource
from grouplora.orchestration.settings import GradientSettings
from grouplora.orchestration.store import DATASETS, FEATURES, META_FEATURES, ArtifactStore

FEATURE_SPLITS = ("train", "validation")


def features_table(df: pd.DataFrame, f0: np.ndarray, feats: np.ndarray) -> pa.Table:
    d = feats.shape[1]
    return pa.table({
        "dataset": pa.array(df["dataset"].tolist()), "example_id": pa.array(df["example_id"].tolist()),
        "split": pa.array(df["split"].tolist()), "label_id": pa.array(df["label_id"].to_numpy(), pa.int32()),
        "f0": pa.array(f0.astype(np.float32)),
        # FLOAT[d] in DuckDB: a fixed-size list keeps d in the schema and reads back to numpy through Arrow
        "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.astype(np.float32).ravel()), d),
    })


def take_features(context: dg.AssetExecutionContext, store: ArtifactStore, warehouse: WarehouseResource,
                  base_model: BaseModelResource, settings: GradientSettings, *, kind: str, view: str,
                  init_adapter: str = "") -> dg.MaterializeResult:
    """One dataset partition's features at θ0 (fresh LoRA, or `init_adapter`), stored as `kind` with a sidecar
    naming θ0, and the DuckDB view `view` over every partition. The body of both feature assets."""
    name = context.partition_key
    df = store.rows(name, FEATURE_SPLITS)
    card = store.card(name)
    theta0 = init_adapter or settings.init_adapter
    theta0_fingerprint = store.adapter_fingerprint(Path(theta0)) if theta0 else ""
    model, tokenizer = base_model.with_lora(settings, init_adapter or None)
    # B = 0 (fresh LoRA): the lora_B gradients only; a trained θ0 (B ≠ 0): lora_A's as well
    projection = Projection.for_model(model, d=settings.d, seed=settings.seed)
    include_a = any(n.endswith("lora_A") for n in projection.names)
    fingerprint = (settings.fingerprint() if not init_adapter
                   else f"d{settings.d}-s{settings.seed}-init:{Path(init_adapter).name}@{theta0_fingerprint}")
    label_ids = label_token_ids(tokenizer, card["label_words"])
    start = time.perf_counter()
    f0, feats = compute_features(model, tokenizer, df["prompt"].tolist(), df["label_id"].tolist(), label_ids,
                                 projection, batch_size=settings.batch_size, max_length=base_model.max_length)
    seconds = time.perf_counter() - start
    if not np.isfinite(feats).all() or not np.isfinite(f0).all():
        raise dg.Failure(f"{name}: non-finite gradient features; nothing written")
    fp = model_fingerprint(model)
    store.write_features(kind, name, features_table(df, f0, feats), {
        "d": projection.d, "seed": projection.seed, "projection_checksum": projection.checksum(),
        "settings": fingerprint, "model_fingerprint": fp, "include_a": include_a, "matrices": len(projection.names),
        "theta0": theta0 or "fresh_lora", "theta0_fingerprint": theta0_fingerprint})
    warehouse.register_parquet(view, store.parquet_glob(kind), {"features": projection.d})
    context.log.info(f"{name}: {len(df)} examples, d={projection.d}, include_a={include_a}, "
                     f"{len(df) / seconds:.1f} examples/s")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(df), "d": projection.d, "seed": projection.seed, "settings": fingerprint,
        "model_fingerprint": fp, "include_a": include_a, "theta0": theta0 or "fresh_lora",
        "theta0_fingerprint": theta0_fingerprint, "projection_checksum": projection.checksum(),
        "projection_bytes": projection.nbytes, "seconds": round(seconds, 2),
        "examples_per_s": round(len(df) / seconds, 2), "mean_f0": float(f0.mean()),
        "feature_norm_median": float(np.median(np.linalg.norm(feats, axis=1))), "dtype": base_model.dtype})


@dg.asset(
    partitions_def=dataset_partitions,
    deps=[dg.AssetKey("dataset")],
    group_name="features",
    kinds={"pytorch", "parquet", "duckdb"},
    code_version="1",
    description="Per train/validation example: f0 and the LoRA gradient of f projected to d dims (one backward per batch).",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def gradient_features(context: dg.AssetExecutionContext, store: ArtifactStore, warehouse: WarehouseResource,
                      base_model: BaseModelResource, gradient_settings: GradientSettings) -> dg.MaterializeResult:
    return take_features(context, store, warehouse, base_model, gradient_settings, kind=FEATURES,
                         view="gradient_features")


@dg.asset(
    partitions_def=dataset_partitions,
    deps=[dg.AssetKey("dataset"), dg.AssetKey("meta_init_adapter")],
    group_name="features",
    kinds={"pytorch", "parquet", "duckdb"},
    code_version="1",
    description="gradient_features at θ0 = the meta-initialization adapter (B ≠ 0: lora_A and lora_B gradients), "
                "for choosing auxiliary datasets (target_selection); DuckDB view meta_gradient_features.",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def meta_gradient_features(context: dg.AssetExecutionContext, store: ArtifactStore, warehouse: WarehouseResource,
                           base_model: BaseModelResource, gradient_settings: GradientSettings) -> dg.MaterializeResult:
    store.meta_init()  # a clear failure when the adapter is missing
    return take_features(context, store, warehouse, base_model, gradient_settings, kind=META_FEATURES,
                         view="meta_gradient_features", init_adapter=str(store.meta_init_dir()))


@dg.asset(
    deps=[dg.AssetKey("dataset")],
    group_name="features",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    description="First-order approximation error |f(θ0+Δ) − f0 − gᵀΔ| / |f(θ0+Δ)| for random LoRA perturbations.",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def approximation_error(context: dg.AssetExecutionContext, store: ArtifactStore, base_model: BaseModelResource,
                        gradient_settings: GradientSettings, mlflow_tracking: MlflowResource) -> dg.MaterializeResult:
    names = store.stored(DATASETS)
    model, tokenizer = base_model.with_lora(gradient_settings)
    rows = []
    for name in names[:4]:  # a few real examples from a few datasets: the full gradient per example is costly
        df = store.rows(name, "validation").head(4)
        label_ids = label_token_ids(tokenizer, store.card(name)["label_words"])
        for row in approximation_errors(model, tokenizer, df["prompt"].tolist(), df["label_id"].tolist(), label_ids,
                                        scales=SCALES, n_draws=2, seed=gradient_settings.seed,
                                        max_length=base_model.max_length):
            rows.append({"dataset": name, **row})
    table = pd.DataFrame(rows)
    summary = table.groupby("scale")[["mean_rel_error", "median_rel_error"]].mean().reset_index()
    png = line_chart(summary["scale"].tolist(), {"mean": summary["mean_rel_error"].tolist(),
                                                 "median": summary["median_rel_error"].tolist()},
                     store.png_path("reports", "approximation_error"),
                     title="First-order approximation error", xlabel="perturbation scale (relative norm)",
                     ylabel="|f(θ0+Δ) − f0 − gᵀΔ| / |f(θ0+Δ)|")
    store.write_report_csv("approximation_error", table)
    mlflow = mlflow_tracking.client_setup()
    with mlflow.start_run(run_name="approximation_error", tags={"dagster.run_id": context.run.run_id}) as run:
        mlflow.log_params({"settings": gradient_settings.fingerprint(), "datasets": ",".join(names[:4])})
        for r in summary.itertuples():
            mlflow.log_metric("mean_rel_error", r.mean_rel_error, step=int(round(r.scale * 1000)))
        mlflow.log_artifact(str(png))
    at_1pct = float(summary.loc[np.isclose(summary["scale"], 0.01), "mean_rel_error"].iloc[0])
    return dg.MaterializeResult(metadata={
        "table": dg.MetadataValue.md(summary.to_markdown(index=False)),
        "mean_rel_error_at_1pct": at_1pct, "plot": dg.MetadataValue.path(str(png)),
        "mlflow_run_id": run.info.run_id, "max_allowed": gradient_settings.approx_max_error})


@dg.asset_check(asset=approximation_error, description="Mean relative error at 1% perturbation stays under the threshold.")
def approximation_error_within_threshold(context: dg.AssetCheckExecutionContext,
                                         gradient_settings: GradientSettings) -> dg.AssetCheckResult:
    event = context.instance.get_latest_materialization_event(dg.AssetKey("approximation_error"))
    value = event.asset_materialization.metadata["mean_rel_error_at_1pct"].value
    return dg.AssetCheckResult(passed=bool(value <= gradient_settings.approx_max_error),
                               metadata={"mean_rel_error_at_1pct": value, "threshold": gradient_settings.approx_max_error})
