"""Subset estimates: the fine-tuning result of every sampled subset of datasets, from gradient features alone."""

import time
import dagster as dg
import numpy as np
import pandas as pd

from grouplora.ml.estimation import estimate_subsets
from grouplora.ml.forward_mode import forward_scores
from grouplora.ml.model import label_token_ids
from grouplora.ml.projection import Projection
from grouplora.ml.subsets import Subset, estimation_subsets
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.resources import BaseModelResource, WarehouseResource
from grouplora.orchestration.settings import EstimationSettings, GradientSettings
from grouplora.orchestration.store import FEATURES, FOLD_SELECT, ArtifactStore


@dg.asset(
    deps=[dg.AssetKey("gradient_features"), dg.AssetKey("lam_calibration")],
    group_name="estimates",
    kinds={"numpy", "parquet", "duckdb"},
    code_version="1",
    description="Estimated validation loss/accuracy of every dataset after fine-tuning on each sampled subset "
                "(all singletons, all pairs, seeded random subsets), by logistic regression on gradient features "
                "at the λ of lam_calibration; validation = its selection fold.",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def subset_estimates(context: dg.AssetExecutionContext, store: ArtifactStore, warehouse: WarehouseResource,
                     estimation_settings: EstimationSettings, base_model: BaseModelResource,
                     gradient_settings: GradientSettings) -> dg.MaterializeResult:
    names = store.current_datasets(context)
    if len(names) < 2:
        raise dg.Failure(f"need gradient features for at least two datasets, have {names}")
    features, feature_settings = store.read_feature_set(names)  # validation: the selection fold
    s = estimation_settings
    calibration = store.calibration(FEATURES, names, feature_settings, s.lam)
    lam = float(calibration["lam"])
    subsets = estimation_subsets(names, n_random=s.n_random, size=s.size, seed=s.seed)
    start = time.perf_counter()
    table, fit = estimate_subsets(features, subsets, lam=lam)
    seconds = time.perf_counter() - start
    singles = [(k, x) for k, x in enumerate(subsets) if x.kind == "singleton"][: s.verify_subsets]
    if singles:
        start_fwd = time.perf_counter()
        forward = verify_forward(store, base_model, gradient_settings, singles, fit.W, feature_settings)
        table = pd.concat([table, forward], ignore_index=True)
        context.log.info(f"forward mode on {len(singles)} subsets in {time.perf_counter() - start_fwd:.1f}s")
    path = store.write_estimates(table, fit.W, [x.id for x in subsets])
    warehouse.register_parquet("subset_estimates", str(path))
    kinds = pd.Series([x.kind for x in subsets]).value_counts().to_dict()
    context.log.info(f"{len(subsets)} subsets of {len(names)} datasets in {seconds:.2f}s")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(table), "n_subsets": len(subsets), "subsets_by_kind": kinds,
        "n_datasets": len(names), "d": feature_settings["d"], "seconds": round(seconds, 3),
        "ms_per_subset": round(1000 * seconds / len(subsets), 3), "converged": float(fit.converged.mean()),
        "lam": lam, "lam_source": calibration["source"], "theta0": calibration["theta0"],
        "projection_checksum": feature_settings["projection_checksum"]})


def verify_forward(store: ArtifactStore, base_model: BaseModelResource, settings: GradientSettings,
                   subsets: list[tuple[int, Subset]], W: np.ndarray, feature_settings: dict) -> pd.DataFrame:
    """Re-score a few subsets' member datasets with the real model at θ0 + P w (mode 'forward'). θ0's LoRA goes on
    the process-wide cached base for the block and comes off again (no copy of the model)."""
    rows = []
    with base_model.lora(settings) as (model, tokenizer):
        projection = Projection.for_model(model, d=settings.d, seed=settings.seed)
        if projection.checksum() != feature_settings["projection_checksum"]:
            raise dg.Failure("the projection differs from the one the features were taken with; re-materialize them")
        for k, subset in subsets:
            for name in subset.members:
                df = store.rows(name, FOLD_SELECT)  # the rows the estimates were scored on
                card = store.card(name)
                out = forward_scores(model, tokenizer, projection, W[k], df["prompt"].tolist(),
                                     df["label_id"].tolist(), label_token_ids(tokenizer, card["label_words"]),
                                     batch_size=base_model.batch_size, max_length=base_model.max_length)
                rows.append({"subset_id": subset.id, "members": list(subset.members), "kind": subset.kind,
                             "dataset": name, "in_subset": True, **out, "mode": "forward"})
    return pd.DataFrame(rows)
