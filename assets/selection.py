"""Choosing auxiliary datasets for a target dataset: target_selection, one partition per target.

Everything is estimated from meta_gradient_features (θ0 = the meta-initialization adapter), nothing is fine-tuned:
a random-ensemble score per auxiliary, forward stepwise selection, and the baselines (none, all, gradient cosine,
mean-hidden-state cosine) of ml/selection.py. Per target: storage/selection/<target>.parquet (one row per
auxiliary; DuckDB view target_selection over every target), .json (chosen sets, forward path), .png (bar chart).
"""

import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import numpy as np

from grouplora.ml.data_format import validate_name
from grouplora.ml.model import model_fingerprint
from grouplora.ml.plots import bar_chart
from grouplora.ml.selection import Selection, mean_hidden_state, select_auxiliaries
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.resources import BaseModelResource, MlflowResource, WarehouseResource
from grouplora.orchestration.settings import SelectionSettings
from grouplora.orchestration.store import META_FEATURES, ArtifactStore, png_markdown


def dataset_hidden_states(store: ArtifactStore, base_model: BaseModelResource, names: list[str],
                          max_examples: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """({dataset: mean answer-position hidden state of the base model over its first `max_examples` train
    prompts}, the names computed now). Cached in the store under a key of the model's fingerprint, max_length
    and the prompts themselves, so other targets (and unchanged reruns) read it back."""
    model, tokenizer = base_model.load()
    fingerprint = model_fingerprint(model)
    out, computed = {}, []
    for name in names:
        prompts = store.rows(name, "train", ["prompt"])["prompt"].head(max_examples).tolist()
        if not prompts:
            continue
        key = hashlib.sha256(json.dumps([fingerprint, base_model.max_length, prompts]).encode()).hexdigest()[:16]
        cached = store.hidden_state(name, key)
        if cached is not None:
            out[name] = cached
            continue
        out[name] = mean_hidden_state(model, tokenizer, prompts, batch_size=base_model.batch_size,
                                      max_length=base_model.max_length)
        store.write_hidden_state(name, key, out[name])
        computed.append(name)
    return out, computed


def selection_chart(selection: Selection, path: Path) -> Path:
    """Random-ensemble score of each auxiliary relative to the mean over all sampled sets (> 0: it helps the
    target more than a random companion); the random ensemble's picks highlighted, forward picks numbered."""
    scores = selection.scores[np.isfinite(selection.scores["score"])]
    mean = selection.settings["mean_score"]
    step = {a: i + 1 for i, a in enumerate(selection.chosen.get("forward_selection", []))}
    label = {a: f"{a} [forward {step[a]}]" if a in step else a for a in scores["aux"]}
    values = {label[a]: float(v - mean) for a, v in zip(scores["aux"], scores["score"])}
    chosen = [label[a] for a in selection.chosen.get("random_ensemble", []) if a in label]
    return bar_chart(values, path, title=f"Auxiliary datasets for {selection.target}",
                     xlabel="random-ensemble score: mean est. −loss of the target over sets with it, "
                            "minus the mean over all sets", highlight=chosen,
                     highlight_label="chosen (random ensemble)")


@dg.asset(
    partitions_def=dataset_partitions,
    # The partition key is the target; every target reads every dataset's meta features.
    deps=[dg.AssetDep(dg.AssetKey("meta_gradient_features"), partition_mapping=dg.AllPartitionMapping()),
          dg.AssetKey("meta_lam_calibration")],
    group_name="selection",
    kinds={"numpy", "parquet", "duckdb", "mlflow"},
    code_version="1",
    description="Auxiliary datasets for one target (the partition key), estimated from meta_gradient_features: "
                "random-ensemble score per auxiliary, forward stepwise selection, and the none / all / gradient "
                "cosine / hidden-state cosine baselines; scores table (DuckDB view target_selection) and bar chart.",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def target_selection(context: dg.AssetExecutionContext, store: ArtifactStore, warehouse: WarehouseResource,
                     base_model: BaseModelResource, selection_settings: SelectionSettings,
                     mlflow_tracking: MlflowResource) -> dg.MaterializeResult:
    target = validate_name(context.partition_key, "target dataset name")
    s = selection_settings
    names = store.current_datasets(context, META_FEATURES)
    if target not in names:
        raise dg.Failure(f"target {target!r} has no meta_gradient_features (have: {names}); materialize them first")
    if len(names) < 2:
        raise dg.Failure(f"no auxiliary datasets besides {target!r}: need meta features of at least two datasets")
    meta = store.meta_init()
    features, feature_settings = store.read_feature_set(names, META_FEATURES)  # validation: the selection fold
    if feature_settings.get("theta0_fingerprint") != meta["fingerprint"]:
        raise dg.Failure(f"meta_gradient_features were taken at meta-init adapter "
                         f"{feature_settings.get('theta0_fingerprint')!r}, the current one is {meta['fingerprint']!r}: "
                         "re-materialize meta_gradient_features for all datasets")
    calibration = store.calibration(META_FEATURES, names, feature_settings, s.lam)
    if calibration["theta0_fingerprint"] != meta["fingerprint"]:
        raise dg.Failure("λ was calibrated at another meta-init adapter: re-materialize meta_lam_calibration")
    lam = float(calibration["lam"])
    start = time.perf_counter()
    hidden, computed = dataset_hidden_states(store, base_model, names, s.hidden_max_examples)
    hidden_seconds = time.perf_counter() - start
    start = time.perf_counter()
    try:
        selection = select_auxiliaries(features, target, hidden=hidden if target in hidden else None, top_k=s.top_k,
                                       n_subsets=s.n_subsets, size=s.size or None, lam=lam, min_gain=s.min_gain,
                                       seed=s.seed)
    except ValueError as e:  # e.g. a target without validation rows
        raise dg.Failure(f"target_selection for {target!r}: {e}") from e
    methods = selection.methods
    seconds = time.perf_counter() - start

    table = selection.table()
    table.insert(0, "target", target)
    parquet, record = store.write_selection(target, table, {
        "target": target, "datasets": names, "chosen": selection.chosen,
        "methods": methods.to_dict(orient="records"), "forward_path": selection.forward_path.to_dict(orient="records"),
        "settings": selection.settings, "lam": lam, "lam_source": calibration["source"],
        "meta_init_fingerprint": meta["fingerprint"],
        "projection_checksum": feature_settings["projection_checksum"]})
    warehouse.register_parquet("target_selection", store.parquet_glob("selection"))
    png = selection_chart(selection, store.png_path("selection", target))

    mlflow = mlflow_tracking.client_setup()
    with mlflow.start_run(run_name=f"target_selection {target}") as run:
        mlflow.set_tags({"grouplora.kind": "target_selection", "grouplora.target": target,
                         "dagster.run_id": context.run.run_id})
        mlflow.log_params({**{k: v for k, v in selection.settings.items() if k != "mean_score"}, "target": target,
                           "n_datasets": len(names), "hidden_max_examples": s.hidden_max_examples,
                           "meta_init_fingerprint": meta["fingerprint"],
                           "projection_checksum": feature_settings["projection_checksum"]})
        mlflow.log_metrics({"mean_score": float(selection.settings["mean_score"]), "seconds": seconds,
                            **{f"est_loss_{r.method}": float(r.est_loss) for r in methods.itertuples()},
                            **{f"est_accuracy_{r.method}": float(r.est_accuracy) for r in methods.itertuples()}})
        for path in (parquet, record, png):
            mlflow.log_artifact(str(path))
    context.log.info(f"{target}: " + "; ".join(f"{m}: {', '.join(c) or '-'}" for m, c in selection.chosen.items()))
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(table), "target": target, "n_aux": len(table),
        "chosen": dg.MetadataValue.json(selection.chosen),
        "methods": dg.MetadataValue.md(methods.round(4).to_markdown(index=False)),
        "scores": dg.MetadataValue.md(table.drop(columns=["target"]).round(4).to_markdown(index=False)),
        "forward_path": dg.MetadataValue.md(selection.forward_path.round(4).to_markdown(index=False)),
        "chart": png_markdown(png), "chart_path": dg.MetadataValue.path(str(png)),
        "lam": lam, "lam_source": calibration["source"], "hidden_states_computed": computed,
        "seconds": round(seconds, 3), "hidden_seconds": round(hidden_seconds, 2),
        "meta_init_fingerprint": meta["fingerprint"], "path": dg.MetadataValue.path(str(parquet)),
        "mlflow_run_id": run.info.run_id})
