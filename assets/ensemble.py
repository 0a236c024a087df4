"""The ACL 2025 ensemble: per group, boosting rounds where its held-out error stays high; per dataset, weights over
its group adapter and that group's rounds; the results table of every method on test.

Validation is split once per dataset (ml.folds): the selection fold chose each adapter's epoch and judges the
boosting rounds (ml.boosting.boost_group); the weights fold fits the ensemble weights only
(ml.ensemble.score_dataset, never all zero: it falls back to the group adapter); test is only reported. The
all-datasets adapter is the baseline: `ensemble_with_all` (it as one more candidate) is a column of its own and is
what the registry serves only with EnsembleSettings.include_all. `ensemble_merged`: the served weights applied as
ONE merged adapter (ml.ensemble.merged_logprobs, one adapter's inference cost).
"""

import shutil
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from grouplora.ml.atomic import atomic_dir
from grouplora.ml.boosting import BoostResult, RidgeBase, boost_group
from grouplora.ml.ensemble import (BASE, AdapterSpec, DatasetSpec, Ensemble, adapter_logprobs, merged_logprobs,
                                   method_costs, release, score_dataset)
from grouplora.ml.lora import lora_on
from grouplora.ml.model import label_token_ids, model_fingerprint
from grouplora.ml.plots import accuracy_table_png
from grouplora.ml.projection import Projection
from grouplora.ml.scoring import accuracy
from grouplora.ml.training import VAL_LOGPROBS, validation_logprobs
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.resources import BaseModelResource, MlflowResource, WarehouseResource
from grouplora.orchestration.settings import EnsembleSettings, GradientSettings, TrainingSettings
from grouplora.orchestration.store import FOLD_SELECT, FOLD_WEIGHTS, ArtifactStore, png_markdown

METHODS = ["zero_shot", "one_adapter_all", "grouped", "grouped_boosted", "ensemble", "ensemble_merged",
           "ensemble_with_all"]
THETA0 = "theta0"  # the ensemble's name for the ridge rounds' reference adapter


def ridge_base(store: ArtifactStore, base_model: BaseModelResource, gradient_settings: GradientSettings,
               names: list[str]) -> RidgeBase:
    """θ0 of the gradient features, the projection they were taken with (checked) and every dataset's train
    features: what ridge rounds (θ0 + Pw) need."""
    theta0_dir, _ = store.features_theta0(base_model, gradient_settings)
    frame, X, sidecar = store.read_features(names)
    model, _ = base_model.load()
    with lora_on(model, adapter=theta0_dir) as pm:
        projection = Projection.for_model(pm, d=gradient_settings.d, seed=gradient_settings.seed)
    if projection.checksum() != sidecar["projection_checksum"]:
        raise dg.Failure("gradient_features were taken with another projection; re-materialize them")
    train = (frame["split"] == "train").to_numpy()
    feats = {n: X[train & (frame["dataset"] == n).to_numpy()] for n in names}
    return RidgeBase(theta0_dir, projection, feats, r=gradient_settings.lora_r)


def zero_shot_is_reference(store: ArtifactStore, base_model: BaseModelResource, gradient_settings: GradientSettings,
                           mode: str) -> bool:
    """Whether the stored zero-shot scores are the log-probs of the boosting rounds' reference θ_ref: the bare
    base (trained rounds), or θ0 when it is a fresh LoRA (B = 0 computes the base's function; ridge rounds).
    Then θ_ref is never scored again in this step."""
    return mode == "trained" or store.features_theta0(base_model, gradient_settings)[1] == "fresh_lora"


def boost_groups(store: ArtifactStore, base_model: BaseModelResource, gradient_settings: GradientSettings,
                 ensemble_settings: EnsembleSettings, training_settings: TrainingSettings, groups: list[dict],
                 log) -> dict[str, BoostResult]:
    """ml.boosting.boost_group for every group (rounds only while its selection-fold loss stays above the
    threshold); rounds go to adapters/boost_<group key>/round_<r>."""
    settings = ensemble_settings.boost()
    model, tokenizer = base_model.load()
    ridge = (ridge_base(store, base_model, gradient_settings, [m for g in groups for m in g["members"]])
             if settings.mode == "ridge" and settings.rounds > 0 else None)
    stored_ref = settings.rounds > 0 and zero_shot_is_reference(store, base_model, gradient_settings, settings.mode)
    out = {}
    for g in groups:
        members = g["members"]
        ref = (tuple({n: store.zero_shot_logprobs(n, sp) for n in members} for sp in ("train", FOLD_SELECT))
               if stored_ref else None)
        select = store.examples_by_dataset(tokenizer, members, FOLD_SELECT)
        out[g["key"]] = boost_group(
            model, tokenizer, g["key"], store.adapter_dir(g["key"]), store.examples_by_dataset(tokenizer, members),
            select, settings, store.adapter_dir(f"boost_{g['key']}"), ridge=ridge, config=training_settings.config(),
            batch_size=base_model.batch_size, max_length=base_model.max_length, reference_logprobs=ref,
            select_logprobs=adapter_select_logprobs(store.adapter_dir(g["key"]), select), log=log)
    return out


def adapter_select_logprobs(adapter_dir: Path, select: dict[str, list]) -> dict[str, np.ndarray] | None:
    """{member: (N, C)} the adapter's log-probs on the selection fold from its own training (the best epoch's
    evaluation, when it ran on exactly these examples, pooled in member order), else None."""
    pooled = [e for ex in select.values() for e in ex]
    lp = validation_logprobs(adapter_dir, pooled) if pooled else None
    if lp is None:
        return None
    out, start = {}, 0
    for n, ex in select.items():
        out[n] = lp[start:start + len(ex), :len(ex[0].label_ids) if ex else 0]
        start += len(ex)
    return out


def round_name(group: str, k: int) -> str:
    return f"{group}_r{k}"


def score_datasets(store: ArtifactStore, base_model: BaseModelResource, spec: dict, boosts: dict[str, BoostResult],
                   ens: Ensemble, include_all: bool, log, zero_shot_reference: bool = False
                   ) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Every dataset's row of the results table (test accuracy per method; the weights-fold accuracies promotion
    compares) and its served weights {adapter: α}. One pass over the prompts per split scores the group adapter,
    its kept rounds and the all-datasets adapter together (ml.ensemble.adapter_logprobs); the rounds' reference
    comes from the stored zero-shot scores when they are its log-probs (zero_shot_reference), and the merged
    column costs no pass when the merge is one adapter already scored."""
    model, tokenizer = base_model.load()
    baseline = spec["baseline"]["key"]
    kw = {"batch_size": base_model.batch_size, "max_length": base_model.max_length}
    rows, weights = [], {}
    for g in spec["groups"]:
        b = boosts[g["key"]]
        rounds = [round_name(g["key"], r.index) for r in b.kept]
        names = [g["key"], *rounds, baseline]
        for n in g["members"]:
            split = {"weights": store.rows(n, FOLD_WEIGHTS), "test": store.rows(n, "test")}
            y = {sp: df["label_id"].to_numpy() for sp, df in split.items()}
            zs = {sp: store.zero_shot_logprobs(n, FOLD_WEIGHTS if sp == "weights" else sp) for sp in split}
            refs = {ens.adapter(r).reference for r in rounds} if zero_shot_reference else set()
            given = {sp: {ref: zs[sp] for ref in refs} for sp in split}
            z = {sp: adapter_logprobs(ens, model, tokenizer, n, df["prompt"].tolist(), names, given=given[sp], **kw)
                 for sp, df in split.items()}
            h = [{sp: z[sp][1 + i] for sp in z} for i in range(len(rounds))]
            out = score_dataset({sp: z[sp][0] for sp in z}, h, b.step_sizes, y, all_adapter={sp: z[sp][-1] for sp in z},
                                include_all=True)
            served = names if include_all else names[:-1]
            alpha = out["weights_with_all"] if include_all else out["weights"]
            weights[n] = {k: float(a) for k, a in zip(served, alpha) if a > 0}  # missing = 0 (Ensemble)
            merged = merged_logprobs(ens, model, tokenizer, n, split["test"]["prompt"].tolist(), weights=weights[n],
                                     scored={g["key"]: z["test"][0], baseline: z["test"][-1]}, **kw)
            chosen = "ensemble_with_all" if include_all else "ensemble"
            row = {"dataset": n, "group": g["key"], "zero_shot": accuracy(zs["test"], y["test"]), **out["accuracy"],
                   "ensemble_merged": float((merged.argmax(-1) == y["test"]).mean()),
                   # weights fold: what promotion compares (orchestration/registry); the ensemble's weights were
                   # fit on it, the baselines' nothing was
                   "ensemble_val": out["weights_fold_accuracy"][chosen], "zero_shot_val": accuracy(zs["weights"], y["weights"]),
                   "one_adapter_all_val": out["weights_fold_accuracy"]["one_adapter_all"],
                   "n_rounds": len(rounds), "fallback": bool(out["fallback_with_all" if include_all else "fallback"]),
                   "weights": [float(a) for a in out["weights"]],
                   "weights_with_all": [float(a) for a in out["weights_with_all"]]}
            log(f"{n}: " + ", ".join(f"{k} {row[k]:.3f}" for k in METHODS))
            rows.append(row)
    return rows, weights


@dg.asset(
    deps=[dg.AssetKey("adapter"), dg.AssetKey("zero_shot_scores"), dg.AssetKey("gradient_features")],
    group_name="ensemble",
    kinds={"pytorch", "mlflow"},
    code_version="2",
    description="The ACL ensemble: boosting rounds per group while its selection-fold loss stays high, per-dataset "
                "weights over the group adapter and its rounds fit on the weights fold; test accuracy of zero-shot, "
                "one adapter on all, grouped, + boosting, the ensemble, merged, and with the all adapter.",
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
    release(model)  # boosting applies adapters to the bare base
    zs_ref = zero_shot_is_reference(store, base_model, gradient_settings, ensemble_settings.boost().mode)
    boosts = boost_groups(store, base_model, gradient_settings, ensemble_settings, training_settings, groups,
                          context.log.info)
    boost_time = time.perf_counter() - start

    cards = {n: store.card(n) for n in spec["datasets"]}
    adapters = [AdapterSpec(g["key"], str(store.adapter_dir(g["key"])), g["members"]) for g in groups]
    for g in groups:
        b = boosts[g["key"]]
        ref = BASE if b.reference is None else THETA0
        adapters += [AdapterSpec(round_name(g["key"], r.index), r.adapter_dir, g["members"], reference=ref)
                     for r in b.kept]
    if any(b.kept and b.reference is not None for b in boosts.values()):
        adapters.append(AdapterSpec(THETA0, next(b.reference for b in boosts.values() if b.reference is not None)))
    adapters.append(AdapterSpec(baseline["key"], str(store.adapter_dir(baseline["key"])), baseline["members"]))
    ens = Ensemble(
        base_model=base_model.model_name(), base_fingerprint=model_fingerprint(model), adapters=adapters, weights={},
        datasets={n: DatasetSpec(c["label_words"], c["template"], label_token_ids(tokenizer, c["label_words"]))
                  for n, c in cards.items()},
        meta={"classes": {n: c["classes"] for n, c in cards.items()}, "partition": spec})
    try:
        rows, weights = score_datasets(store, base_model, spec, boosts, ens, ensemble_settings.include_all,
                                       context.log.info, zero_shot_reference=zs_ref)
    finally:
        release(model)  # the process-wide cached base goes back without the adapters loaded into it
    ens.weights = weights
    used = {n for w in weights.values() for n, a in w.items() if a > 0}
    used |= {ens.adapter(n).reference for n in used} - {None, BASE}
    ens.adapters = [a for a in ens.adapters if a.name in used]
    table = pd.DataFrame(rows).set_index("dataset")
    costs = method_costs([results[g["key"]] for g in groups], list(boosts.values()), results[baseline["key"]])
    cost_table = pd.DataFrame([{"method": m, "train_flops": c["flops"], "optimizer_steps": c["steps"],
                                "adapters": c["adapters"], "peak_memory_mb": round(c["peak_memory_bytes"] / 2**20, 1)}
                               for m, c in costs.items()])
    val_accuracy = float(table["ensemble_val"].mean())
    boost_info = {k: b.to_dict() for k, b in boosts.items()}

    out = store.ensemble_dir()
    with atomic_dir(out) as tmp:  # a self-contained folder: JSON + copies of the adapters it uses
        for a in ens.adapters:
            shutil.copytree(a.path, tmp / a.name, ignore=shutil.ignore_patterns("checkpoints", VAL_LOGPROBS))
            a.path = a.name
        ens.meta.update({"val_accuracy": val_accuracy, "include_all": ensemble_settings.include_all,
                         "boosting": {k: {"mode": b.mode, "step_sizes": b.step_sizes, "stop": b.stop,
                                          "rounds_kept": len(b.kept)} for k, b in boosts.items()}})
        ens.save(tmp / "ensemble.json")
    results_path = store.write_ensemble_results(table.drop(columns=["weights", "weights_with_all"]).reset_index())
    warehouse.register_parquet("ensemble_results", str(results_path))
    summary = table[METHODS].mean().rename("MEAN")
    png = accuracy_table_png(table[METHODS].T, store.png_path("ensemble", "results"),
                             title="Test accuracy per dataset")
    mlflow = mlflow_tracking.client_setup()
    with mlflow.start_run(run_name="ensemble") as run:
        mlflow.set_tags({"grouplora.kind": "ensemble", "dagster.run_id": context.run_id})
        mlflow.log_params({"boost_mode": ensemble_settings.boost_mode, "boost_rounds": ensemble_settings.boost_rounds,
                           "boost_eta": ensemble_settings.boost_eta, "include_all": ensemble_settings.include_all})
        mlflow.log_metrics({f"test_accuracy_{k}": float(v) for k, v in summary.items()})
        mlflow.log_metrics({f"train_flops_{m}": float(c["flops"]) for m, c in costs.items()})
        mlflow.log_metric("val_accuracy", val_accuracy)
        mlflow.log_dict({"boosting": boost_info, "costs": costs}, "boosting.json")
        mlflow.log_artifact(str(png))
        mlflow.log_artifact(str(out / "ensemble.json"))
    store.write_ensemble_info({"mlflow_run_id": run.info.run_id, "val_accuracy": val_accuracy,
                               "val_zero_shot": float(table["zero_shot_val"].mean()),
                               "val_one_adapter_all": float(table["one_adapter_all_val"].mean()),
                               "method_costs": costs, "boosting": boost_info})
    md = table[METHODS].copy()
    md.loc["MEAN"] = summary
    rounds = pd.DataFrame([{"group": k, "mode": b.mode, "threshold_loss": round(b.select_loss, 4),
                            "rounds_tried": len(b.rounds), "rounds_kept": len(b.kept),
                            "step_sizes": ", ".join(f"{x:.3g}" for x in b.step_sizes), "stop": b.stop}
                           for k, b in boosts.items()])
    return dg.MaterializeResult(metadata={
        "accuracy": dg.MetadataValue.md(md.round(3).to_markdown()), "plot": png_markdown(png),
        "costs": dg.MetadataValue.md(cost_table.to_markdown(index=False)),
        "boosting": dg.MetadataValue.md(rounds.to_markdown(index=False)),
        **{f"mean_{k}": float(v) for k, v in summary.items()},
        "val_accuracy": val_accuracy, "boosted_groups": [k for k, b in boosts.items() if b.kept],
        "fallbacks": [n for n in table.index if table.loc[n, "fallback"]],
        "served_adapters": [a.name for a in ens.adapters], "include_all": ensemble_settings.include_all,
        "mlflow_run_id": run.info.run_id, "boost_seconds": round(boost_time, 1),
        "seconds": round(time.perf_counter() - start, 1)})
