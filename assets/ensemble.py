"""The ensemble: per-dataset weights over the adapters, cheap boosting where a group's error stays high, and
the results table (zero-shot, one adapter on all, grouped, + boosting, ensemble) on test."""

import shutil
import time

import dagster as dg
import numpy as np
import pandas as pd

from grouplora.ml.atomic import atomic_dir
from grouplora.ml.boosting import boost_adapter_from_w, negative_gradient, ridge_boost, train_boost_adapter
from grouplora.ml.ensemble import AdapterSpec, DatasetSpec, Ensemble, adapter_logprobs, dataset_methods, release
from grouplora.ml.forward_mode import log_odds_from_logprobs
from grouplora.ml.model import label_token_ids, model_fingerprint
from grouplora.ml.plots import accuracy_table_png
from grouplora.ml.projection import Projection
from grouplora.ml.scoring import accuracy
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.resources import BaseModelResource, MlflowResource, WarehouseResource
from grouplora.orchestration.settings import EnsembleSettings, GradientSettings, TrainingSettings
from grouplora.orchestration.store import ArtifactStore, png_markdown

METHODS = ["zero_shot", "one_adapter_all", "grouped", "grouped_boosted", "ensemble"]


def boost_group(store: ArtifactStore, base_model: BaseModelResource, gradient_settings: GradientSettings,
                settings: EnsembleSettings, training_settings: TrainingSettings, group: dict, ens: Ensemble,
                model, tokenizer, log) -> str:
    """One boosting round for a group whose adapter still errs, fit to that adapter's residuals.

    ridge (GradEx view, no training): ridge-fit the gradient features of the group's train examples to the
    residuals σ(−m) of its adapter and map w back through the projection into a LoRA adapter θ0 + Pw.
    trained: train a fresh adapter on the group's examples weighted by the adapter's current loss.
    The caller keeps the round only if it lowers validation loss."""
    members, key = group["members"], group["key"]
    logprobs, labels = [], []
    for name in members:  # the group adapter on its own train data
        df = store.rows(name, "train")
        logprobs.append(adapter_logprobs(ens, model, tokenizer, name, df["prompt"].tolist(), [key])[0])
        labels.append(df["label_id"].to_numpy())
    release(model)  # the base goes back clean: the next steps add their own LoRA layers
    name = f"boost_{key}"
    out = store.adapter_dir(name)
    if settings.boost_mode == "trained":
        loss = np.concatenate([-lp[np.arange(len(y)), y] for lp, y in zip(logprobs, labels)])
        train_boost_adapter((model, tokenizer), store.examples(tokenizer, members), loss,
                            training_settings.config(), out)
        log.info(f"trained boosting adapter for {key}: mean current loss {loss.mean():.3f}")
        return name
    margins = np.concatenate([log_odds_from_logprobs(lp, y) for lp, y in zip(logprobs, labels)])
    residual = negative_gradient(margins)  # σ(−m): large where the adapter is still wrong
    frame, X, feature_settings = store.read_features(members)
    w = ridge_boost(X[frame["split"].to_numpy() == "train"], residual, settings.boost_lam)
    theta0, _ = base_model.with_lora(gradient_settings)
    projection = Projection.for_model(theta0, d=gradient_settings.d, seed=gradient_settings.seed)
    if projection.checksum() != feature_settings["projection_checksum"]:
        raise dg.Failure("features were taken with another projection; re-materialize gradient_features")
    theta0_dir = store.adapter_dir(f"theta0_{feature_settings['projection_checksum']}")
    if not theta0_dir.exists():
        with atomic_dir(theta0_dir) as tmp:
            theta0.save_pretrained(str(tmp))
    boost_adapter_from_w(theta0_dir, projection, w, out, r=gradient_settings.lora_r)
    log.info(f"ridge boosting for {key}: mean residual {residual.mean():.3f}, |w| {np.linalg.norm(w):.3g}")
    return name


def fit_ensemble(store: ArtifactStore, base_model: BaseModelResource, gradient_settings: GradientSettings,
                 ensemble_settings: EnsembleSettings, training_settings: TrainingSettings, spec: dict, results: dict,
                 ens: Ensemble, model, tokenizer, log) -> tuple[list[dict], dict, dict, dict]:
    """Boost the groups that need it, fit each dataset's weights on validation, score every method on test.
    Returns (result rows, weights per dataset, boosting rounds kept per dataset, boosted group -> adapter)."""
    groups, baseline = spec["groups"], spec["baseline"]
    group_of = {m: g for g in groups for m in g["members"]}
    boosted: dict[str, str] = {}
    for g in groups:
        if results[g["key"]]["final_loss"] > ensemble_settings.boost_threshold and ensemble_settings.boost_rounds > 0:
            name = boost_group(store, base_model, gradient_settings, ensemble_settings, training_settings, g, ens,
                               model, tokenizer, log)
            ens.adapters.append(AdapterSpec(name, str(store.adapter_dir(name)), g["members"]))
            boosted[g["key"]] = name

    rows, weights, kept = [], {}, {}
    for n in spec["datasets"]:
        val, test = store.rows(n, "validation"), store.rows(n, "test")
        g = group_of[n]["key"]
        names = [g, baseline["key"]] + ([boosted[g]] if g in boosted else [])
        zv = adapter_logprobs(ens, model, tokenizer, n, val["prompt"].tolist(), names)
        zt = adapter_logprobs(ens, model, tokenizer, n, test["prompt"].tolist(), names)
        yv, yt = val["label_id"].to_numpy(), test["label_id"].to_numpy()
        zs = store.zero_shot(n)
        zs_test = np.stack(zs[zs["split"] == "test"]["logprobs"].to_numpy())
        zs_val = np.stack(zs[zs["split"] == "validation"]["logprobs"].to_numpy())
        scores, alpha, keep = dataset_methods(zv, yv, zt, yt, boosted=g in boosted)
        if keep is not None:
            kept[n] = keep
        row = {"dataset": n, "zero_shot": accuracy(zs_test, yt), **scores,
               # the baselines on validation: promotion requires the ensemble to beat them (orchestration/registry)
               "zero_shot_val": accuracy(zs_val, yv), "one_adapter_all_val": accuracy(zv[1], yv)}
        weights[n] = {k: float(v) for k, v in zip(names, alpha)}
        log.info(f"{n}: " + ", ".join(f"{k} {row[k]:.3f}" for k in METHODS))
        rows.append(row)
    return rows, weights, kept, boosted


@dg.asset(
    deps=[dg.AssetKey("adapter"), dg.AssetKey("zero_shot_scores"), dg.AssetKey("gradient_features")],
    group_name="ensemble",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    description="Per-dataset non-negative weights over the adapters (fit on validation), cheap boosting rounds, "
                "and test accuracy of zero-shot, one adapter on all, grouped, + boosting and the ensemble.",
    op_tags=GPU_OP_TAGS,  # loads the model
    pool=GPU_POOL,
)
def ensemble(context: dg.AssetExecutionContext, store: ArtifactStore, base_model: BaseModelResource,
             gradient_settings: GradientSettings, ensemble_settings: EnsembleSettings,
             training_settings: TrainingSettings, mlflow_tracking: MlflowResource,
             warehouse: WarehouseResource) -> dg.MaterializeResult:
    start = time.perf_counter()
    spec = store.partition()
    groups, baseline = spec["groups"], spec["baseline"]
    results = {}
    for g in [*groups, baseline]:
        results[g["key"]] = store.adapter_result(g["key"])
        if results[g["key"]] is None:
            raise dg.Failure(f"adapter {g['key']} ({', '.join(g['members'])}) is not trained yet")
    model, tokenizer = base_model.load()
    cards = {n: store.card(n) for n in spec["datasets"]}
    ens = Ensemble(
        base_model=base_model.model_name(), base_fingerprint=model_fingerprint(model),
        adapters=[AdapterSpec(g["key"], str(store.adapter_dir(g["key"])), g["members"])
                  for g in [*groups, baseline]],
        weights={}, datasets={n: DatasetSpec(c["label_words"], c["template"], label_token_ids(tokenizer, c["label_words"]))
                              for n, c in cards.items()},
        meta={"classes": {n: c["classes"] for n, c in cards.items()}, "partition": spec})

    try:
        rows, weights, kept, boosted = fit_ensemble(store, base_model, gradient_settings, ensemble_settings,
                                                    training_settings, spec, results, ens, model, tokenizer,
                                                    context.log)
    finally:
        release(model)  # the process-wide cached base goes back without the adapters loaded into it
    ens.weights = weights
    ens.adapters = [a for a in ens.adapters if any(a.name in w for w in weights.values())]
    table = pd.DataFrame(rows).set_index("dataset")
    costs = method_costs(results, groups, baseline)

    out = store.ensemble_dir()
    with atomic_dir(out) as tmp:  # a self-contained folder: JSON + copies of the adapters it uses
        for a in ens.adapters:
            shutil.copytree(a.path, tmp / a.name, ignore=shutil.ignore_patterns("checkpoints"))
            a.path = a.name
        ens.meta.update({"val_accuracy": float(table["ensemble_val"].mean()), "boost_kept": kept})
        ens.save(tmp / "ensemble.json")
    results_path = store.write_ensemble_results(table.reset_index())
    warehouse.register_parquet("ensemble_results", str(results_path))
    summary = table[METHODS].mean().rename("MEAN")
    png = accuracy_table_png(table[METHODS].T, store.png_path("ensemble", "results"),
                             title="Test accuracy per dataset")
    mlflow = mlflow_tracking.client_setup()
    with mlflow.start_run(run_name="ensemble") as run:
        mlflow.set_tags({"grouplora.kind": "ensemble", "dagster.run_id": context.run_id})
        mlflow.log_metrics({f"test_accuracy_{k}": float(v) for k, v in summary.items()})
        mlflow.log_metric("val_accuracy", float(table["ensemble_val"].mean()))
        mlflow.log_artifact(str(png))
        mlflow.log_artifact(str(out / "ensemble.json"))
    store.write_ensemble_info({"mlflow_run_id": run.info.run_id, "val_accuracy": float(table["ensemble_val"].mean()),
                               "val_zero_shot": float(table["zero_shot_val"].mean()),
                               "val_one_adapter_all": float(table["one_adapter_all_val"].mean())})
    md = table[METHODS].copy()
    md.loc["MEAN"] = summary
    return dg.MaterializeResult(metadata={
        "accuracy": dg.MetadataValue.md(md.round(3).to_markdown()), "plot": png_markdown(png),
        "costs": dg.MetadataValue.md(costs.to_markdown(index=False)),
        **{f"mean_{k}": float(v) for k, v in summary.items()},
        "val_accuracy": float(table["ensemble_val"].mean()), "boosted_groups": list(boosted),
        "mlflow_run_id": run.info.run_id, "seconds": round(time.perf_counter() - start, 1)})


def method_costs(results: dict, groups: list[dict], baseline: dict) -> pd.DataFrame:
    """Training FLOPs and peak memory behind each method (boosting by ridge costs no training FLOPs)."""
    grouped = sum(results[g["key"]]["flops"] for g in groups)
    peak = max(results[g["key"]]["peak_memory_bytes"] for g in groups)
    base = results[baseline["key"]]
    return pd.DataFrame([
        {"method": "zero_shot", "train_flops": 0, "peak_memory_mb": 0.0},
        {"method": "one_adapter_all", "train_flops": base["flops"], "peak_memory_mb": base["peak_memory_bytes"] / 2**20},
        {"method": "grouped", "train_flops": grouped, "peak_memory_mb": peak / 2**20},
        {"method": "grouped_boosted", "train_flops": grouped, "peak_memory_mb": peak / 2**20},
        {"method": "ensemble", "train_flops": grouped + base["flops"],
         "peak_memory_mb": max(peak, base["peak_memory_bytes"]) / 2**20},
    ])
