"""The pass at θ0 over each dataset: gradient features (per example, f0 = log-odds of the gold label at θ0 and the
projected LoRA gradient of f) and, from the same forward, the zero-shot scores; the meta-init features; the
first-order approximation error.

At a fresh LoRA (B = 0) θ0 IS the base model, so the label log-probs of the features pass's forward are the
zero-shot scores: `theta0_pass` materializes `zero_shot_scores` and `gradient_features` from ONE forward (+ the
backward) over train and validation, and a forward alone over test. Two assets, one step.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa

from grouplora.ml.approx import SCALES, approximation_errors
from grouplora.ml.features import compute_features
from grouplora.ml.model import label_token_ids, model_fingerprint
from grouplora.ml.plots import line_chart
from grouplora.ml.scoring import batching, predict_logprobs
from grouplora.ml.projection import Projection
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.resources import BaseModelResource, MlflowResource, WarehouseResource
from grouplora.orchestration.settings import GradientSettings
from grouplora.orchestration.store import DATASETS, FEATURES, META_FEATURES, ZERO_SHOT, ArtifactStore

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


def zero_shot_table(name: str, df: pd.DataFrame, logprobs: np.ndarray) -> pd.DataFrame:
    pred = logprobs.argmax(1)
    labels = df["label_id"].to_numpy()
    return pd.DataFrame({"dataset": name, "example_id": df["example_id"].to_numpy(), "split": df["split"].to_numpy(),
                         "label_id": labels, "pred": pred, "correct": pred == labels,
                         "logprobs": list(logprobs.astype(np.float32))})


@dataclass
class Pass:
    """One dataset's features pass at θ0 over train + validation, and what it was taken with."""

    df: pd.DataFrame
    f0: np.ndarray
    feats: np.ndarray
    logprobs: np.ndarray  # label log-softmax of the same forward: the zero-shot scores when θ0 is a fresh LoRA
    sidecar: dict  # names θ0 and the projection: stored beside the features, and the assets' metadata
    seconds: float


def features_pass(store: ArtifactStore, base_model: BaseModelResource, settings: GradientSettings, name: str,
                  init_adapter: str = "") -> Pass:
    """f0, features and label log-probs of one dataset's train + validation examples at θ0 (fresh LoRA, or
    `init_adapter`), batched by length within the settings' token budget; the cached base comes back clean."""
    df = store.rows(name, FEATURE_SPLITS)
    card = store.card(name)
    theta0 = init_adapter or settings.init_adapter
    theta0_fingerprint = store.adapter_fingerprint(Path(theta0)) if theta0 else ""
    fingerprint = (settings.fingerprint() if not init_adapter
                   else f"d{settings.d}-s{settings.seed}-init:{Path(init_adapter).name}@{theta0_fingerprint}")
    with base_model.lora(settings, init_adapter or None) as (model, tokenizer):
        # B = 0 (fresh LoRA): the lora_B gradients only; a trained θ0 (B ≠ 0): lora_A's as well
        projection = Projection.for_model(model, d=settings.d, seed=settings.seed)
        include_a = any(n.endswith("lora_A") for n in projection.names)
        label_ids = label_token_ids(tokenizer, card["label_words"])
        start = time.perf_counter()
        f0, feats, logprobs = compute_features(
            model, tokenizer, df["prompt"].tolist(), df["label_id"].tolist(), label_ids, projection,
            max_length=base_model.max_length, return_logprobs=True,
            **batching(base_model.torch_device(), settings.batch_size, settings.max_tokens))
        seconds = time.perf_counter() - start
        fp = model_fingerprint(model)
    if not np.isfinite(feats).all() or not np.isfinite(f0).all():
        raise dg.Failure(f"{name}: non-finite gradient features; nothing written")
    sidecar = {"d": projection.d, "seed": projection.seed, "projection_checksum": projection.checksum(),
               "settings": fingerprint, "model_fingerprint": fp, "include_a": include_a,
               "matrices": len(projection.names), "theta0": theta0 or "fresh_lora",
               "theta0_fingerprint": theta0_fingerprint}
    return Pass(df, f0, feats, logprobs, sidecar | {"projection_bytes": projection.nbytes}, seconds)


def store_features(context: dg.AssetExecutionContext, store: ArtifactStore, warehouse: WarehouseResource,
                   base_model: BaseModelResource, p: Pass, *, kind: str, view: str,
                   asset_key: str | None = None) -> dg.MaterializeResult:
    """Write one partition's features as `kind` with their sidecar and (re)create the DuckDB view `view` over
    every partition; the materialization (of `asset_key`, in a multi-asset)."""
    name = context.partition_key
    side = {k: v for k, v in p.sidecar.items() if k != "projection_bytes"}
    store.write_features(kind, name, features_table(p.df, p.f0, p.feats), side)
    warehouse.register_parquet(view, store.parquet_glob(kind), {"features": side["d"]})
    n = len(p.df)
    context.log.info(f"{name}: {n} examples, d={side['d']}, include_a={side['include_a']}, "
                     f"{n / p.seconds:.1f} examples/s")
    return dg.MaterializeResult(asset_key=asset_key, metadata={
        "dagster/row_count": n, **{k: v for k, v in p.sidecar.items() if k != "matrices"},
        "seconds": round(p.seconds, 2), "examples_per_s": round(n / p.seconds, 2), "mean_f0": float(p.f0.mean()),
        "feature_norm_median": float(np.median(np.linalg.norm(p.feats, axis=1))), "dtype": base_model.dtype})


def zero_shot_logprobs(store: ArtifactStore, base_model: BaseModelResource, name: str, df: pd.DataFrame
                       ) -> np.ndarray:
    """(N, C) label log-probs of the bare base model on df's prompts (a forward, no gradients)."""
    model, tokenizer = base_model.load()
    label_ids = label_token_ids(tokenizer, store.card(name)["label_words"])
    return predict_logprobs(model, tokenizer, df["prompt"].tolist(), label_ids, max_length=base_model.max_length,
                            **base_model.batching())


@dg.multi_asset(
    specs=[
        dg.AssetSpec("zero_shot_scores", deps=[dg.AssetKey("dataset")], group_name="data",
                     kinds={"pytorch", "parquet"}, code_version="2", partitions_def=dataset_partitions,
                     description="Zero-shot label log-probabilities of the base model for every example of one "
                                 "dataset (train and validation from gradient_features' forward, test scored)."),
        dg.AssetSpec("gradient_features", deps=[dg.AssetKey("dataset")], group_name="features",
                     kinds={"pytorch", "parquet", "duckdb"}, code_version="2", partitions_def=dataset_partitions,
                     description="Per train/validation example: f0 and the LoRA gradient of f projected to d dims "
                                 "(one backward per batch)."),
    ],
    name="theta0_pass",
    partitions_def=dataset_partitions,
    description="One pass at θ0 per dataset: its forward gives the zero-shot scores, its backward the features.",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def theta0_pass(context: dg.AssetExecutionContext, store: ArtifactStore, warehouse: WarehouseResource,
                base_model: BaseModelResource, gradient_settings: GradientSettings):
    name = context.partition_key
    p = features_pass(store, base_model, gradient_settings, name)
    yield store_features(context, store, warehouse, base_model, p, kind=FEATURES, view="gradient_features",
                         asset_key="gradient_features")

    start = time.perf_counter()
    df = store.rows(name)
    fresh = not gradient_settings.init_adapter
    if fresh:  # train + validation from the features pass (the same rows in the same order); test alone
        logprobs = np.zeros((len(df), p.logprobs.shape[1]), dtype=np.float32)
        in_pass = df["split"].isin(FEATURE_SPLITS).to_numpy()
        if not df.loc[in_pass, "example_id"].reset_index(drop=True).equals(p.df["example_id"]):
            raise dg.Failure(f"{name}: the dataset's rows changed during the step; nothing written")
        logprobs[in_pass] = p.logprobs
        logprobs[~in_pass] = zero_shot_logprobs(store, base_model, name, df[~in_pass])
    else:  # θ0 is a trained adapter, not the base: every split on the base
        logprobs = zero_shot_logprobs(store, base_model, name, df)
    seconds = time.perf_counter() - start
    out = zero_shot_table(name, df, logprobs)
    store.write_zero_shot(name, out)
    warehouse.register_parquet("zero_shot_scores", store.parquet_glob(ZERO_SHOT))
    acc = out.groupby("split")["correct"].mean().round(4).to_dict()
    context.log.info(f"{name}: zero-shot accuracy {acc}" + (" (train/validation from the features pass)"
                                                            if fresh else ""))
    yield dg.MaterializeResult(asset_key="zero_shot_scores", metadata={
        "dagster/row_count": len(out), **{f"accuracy_{k}": float(v) for k, v in acc.items()},
        "chance": 1.0 / logprobs.shape[1], "seconds": round(seconds, 2), "from_features_pass": fresh,
        "model_fingerprint": model_fingerprint(base_model.load()[0]), "dtype": base_model.dtype})


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
    p = features_pass(store, base_model, gradient_settings, context.partition_key, str(store.meta_init_dir()))
    return store_features(context, store, warehouse, base_model, p, kind=META_FEATURES,
                          view="meta_gradient_features")


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
    rows = []
    with base_model.lora(gradient_settings) as (model, tokenizer):
        for name in names[:4]:  # a few real examples from a few datasets: the full gradient per example is costly
            df = store.rows(name, "validation").head(4)
            label_ids = label_token_ids(tokenizer, store.card(name)["label_words"])
            for row in approximation_errors(model, tokenizer, df["prompt"].tolist(), df["label_id"].tolist(),
                                            label_ids, scales=SCALES, n_draws=2, seed=gradient_settings.seed,
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
