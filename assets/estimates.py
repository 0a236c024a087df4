"""Subset estimates: the fine-tuning result of every sampled subset of datasets, from gradient features alone."""

import json
import time
from math import comb

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from grouplora.assets.datasets import current_datasets
from grouplora.assets.features import gradient_features, lora_model
from grouplora.ml.atomic import write_parquet
from grouplora.ml.estimation import FeatureSet, score, solve_subsets
from grouplora.ml.forward_mode import forward_scores
from grouplora.ml.model import label_token_ids
from grouplora.ml.projection import Projection
from grouplora.ml.subsets import Subset, make_subsets
from grouplora.orchestration.resources import (BaseModelResource, EstimationSettings, GradientSettings,
                                               StorageResource, WarehouseResource)


def read_features(storage: StorageResource, names: list[str], kind: str = "features"
                  ) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """All datasets' features as one frame plus an (N, d) array; refuses partitions taken with another projection.
    kind: the storage folder, "features" (gradient_features, θ0 = fresh LoRA) or "features_meta"
    (meta_gradient_features, θ0 = the meta-initialization adapter)."""
    frames, blocks, settings = [], [], {}
    for name in names:
        table = pq.read_table(storage.path(kind, name))
        d = table.schema.field("features").type.list_size
        blocks.append(table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, d))
        frames.append(table.drop(["features"]).to_pandas())
        settings[name] = json.loads(storage.path(kind, name, ".json").read_text())
    keys = {(s["d"], s["seed"], s["projection_checksum"], s["model_fingerprint"]) for s in settings.values()}
    if len(keys) > 1:
        by = {n: s["settings"] for n, s in settings.items()}
        asset = "meta_gradient_features" if kind == "features_meta" else "gradient_features"
        raise dg.Failure(f"{asset} were taken with different projections or models: {by}; "
                         f"re-materialize {asset} for all datasets")
    return pd.concat(frames, ignore_index=True), np.concatenate(blocks), next(iter(settings.values()))


@dg.asset(
    deps=[gradient_features],
    group_name="estimates",
    kinds={"numpy", "parquet", "duckdb"},
    code_version="1",
    description="Estimated validation loss/accuracy of every dataset after fine-tuning on each sampled subset "
                "(all singletons, all pairs, seeded random subsets), by logistic regression on gradient features.",
)
def subset_estimates(context: dg.AssetExecutionContext, storage: StorageResource, warehouse: WarehouseResource,
                     estimation_settings: EstimationSettings, base_model: BaseModelResource,
                     gradient_settings: GradientSettings) -> dg.MaterializeResult:
    names = current_datasets(context, storage)
    if len(names) < 2:
        raise dg.Failure(f"need gradient features for at least two datasets, have {names}")
    frame, X, feature_settings = read_features(storage, names)
    features = FeatureSet.from_frame(frame, X)
    s = estimation_settings
    size = min(s.size, len(names))
    # singletons and pairs are always in; random subsets of size ≤ 2 would repeat them
    n_random = min(s.n_random, comb(len(names), size)) if size > 2 else 0
    subsets = make_subsets(names, n_random=n_random, size=size, seed=s.seed)
    start = time.perf_counter()
    fit = solve_subsets(features, subsets, lam=s.lam)
    table = score(features, subsets, fit.W)
    seconds = time.perf_counter() - start
    table["mode"] = "linearized"
    singles = [(k, x) for k, x in enumerate(subsets) if x.kind == "singleton"][: s.verify_subsets]
    if singles:
        start_fwd = time.perf_counter()
        forward = verify_forward(storage, base_model, gradient_settings, singles, fit.W, feature_settings)
        table = pd.concat([table, forward], ignore_index=True)
        context.log.info(f"forward mode on {len(singles)} subsets in {time.perf_counter() - start_fwd:.1f}s")
    write_parquet(table, storage.path("estimates", "subset_estimates"))
    np.save(storage.path("estimates", "subset_weights", ".npy"), fit.W)  # row k: subset k's w (for forward mode)
    write_parquet(pd.DataFrame({"subset_id": [x.id for x in subsets]}), storage.path("estimates", "subset_order"))
    warehouse.register_parquet("subset_estimates", str(storage.path("estimates", "subset_estimates")))
    kinds = pd.Series([x.kind for x in subsets]).value_counts().to_dict()
    context.log.info(f"{len(subsets)} subsets of {len(names)} datasets in {seconds:.2f}s")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(table), "n_subsets": len(subsets), "subsets_by_kind": kinds,
        "n_datasets": len(names), "d": feature_settings["d"], "seconds": round(seconds, 3),
        "ms_per_subset": round(1000 * seconds / len(subsets), 3), "converged": float(fit.converged.mean()),
        "lam": s.lam, "projection_checksum": feature_settings["projection_checksum"]})


def verify_forward(storage: StorageResource, base_model: BaseModelResource, settings: GradientSettings,
                   subsets: list[tuple[int, Subset]], W: np.ndarray, feature_settings: dict) -> pd.DataFrame:
    """Re-score a few subsets' member datasets with the real model at θ0 + P w (mode 'forward')."""
    model, tokenizer = lora_model(base_model, settings)
    projection = Projection.for_model(model, d=settings.d, seed=settings.seed)
    if projection.checksum() != feature_settings["projection_checksum"]:
        raise dg.Failure("the projection differs from the one the features were taken with; re-materialize them")
    rows = []
    for k, subset in subsets:
        for name in subset.members:
            df = pd.read_parquet(storage.path("datasets", name))
            df = df[df["split"] == "validation"]
            card = json.loads(storage.path("datasets", name, ".json").read_text())
            out = forward_scores(model, tokenizer, projection, W[k], df["prompt"].tolist(), df["label_id"].tolist(),
                                 label_token_ids(tokenizer, card["label_words"]), batch_size=base_model.batch_size,
                                 max_length=base_model.max_length)
            rows.append({"subset_id": subset.id, "members": list(subset.members), "kind": subset.kind,
                         "dataset": name, "in_subset": True, **out, "mode": "forward"})
    return pd.DataFrame(rows)
