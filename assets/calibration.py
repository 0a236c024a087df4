"""λ calibration: the estimator's L2 penalty chosen against real fine-tunes, at the θ0 the estimates use.

A few random subsets of datasets are really fine-tuned from θ0 (ml.calibration.calibrate_by_finetuning) and every
member's loss on the selection fold of validation is compared with the first-order estimate on a λ grid; λ is
the grid value with the lowest mean relative loss error. `lam_calibration` serves subset_estimates (θ0 = the
features' fresh LoRA, or GradientSettings.init_adapter), `meta_lam_calibration` serves target_selection (θ0 = the
meta-initialization): a λ calibrated at one θ0 says nothing about the other. A pinned λ (EstimationSettings.lam,
SelectionSettings.lam) skips the fine-tunes and is recorded as source "pinned".
"""

import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from grouplora.ml.calibration import calibrate_by_finetuning
from grouplora.ml.training import TrainConfig
from grouplora.orchestration.devices import GPU_OP_TAGS, GPU_POOL
from grouplora.orchestration.resources import BaseModelResource, MlflowResource
from grouplora.orchestration.settings import (EstimationSettings, GradientSettings, SelectionSettings,
                                              TrainingSettings)
from grouplora.orchestration.store import FEATURES, FOLD_SELECT, META_FEATURES, ArtifactStore


def recipe(training_settings: TrainingSettings, theta0_dir: Path, max_steps: int) -> TrainConfig:
    """The adapters' training recipe, with θ0's LoRA shape (a warm start must match it) and an optional step cap."""
    cfg = json.loads((Path(theta0_dir) / "adapter_config.json").read_text())
    base = training_settings.config()
    return TrainConfig(**{**base.__dict__, "r": int(cfg["r"]), "alpha": int(cfg["lora_alpha"]),
                          "target_modules": tuple(sorted(cfg["target_modules"])), "max_steps": max_steps or None})


def run_calibration(context: dg.AssetExecutionContext, store: ArtifactStore, base_model: BaseModelResource,
                    training_settings: TrainingSettings, mlflow_tracking: MlflowResource, *, kind: str, theta0: str,
                    theta0_dir: Path, theta0_fingerprint: str, pinned: float | None, n_subsets: int, size: int,
                    max_steps: int) -> dg.MaterializeResult:
    """The body of both calibration assets: fine-tune, calibrate, store, log to MLflow, report."""
    start = time.perf_counter()
    names = store.current_datasets(context, kind)
    if len(names) < 2:
        raise dg.Failure(f"need {kind} of at least two datasets to calibrate λ, have {names}")
    features, sidecar = store.read_feature_set(names, kind)
    model, tokenizer = base_model.load()
    config = recipe(training_settings, theta0_dir, max_steps)
    ident = hashlib.sha256(json.dumps([kind, sidecar["settings"], theta0_fingerprint, repr(config), names,
                                       [float(features.train[n].G.sum()) for n in names]]).encode()).hexdigest()[:12]
    work = store.training_dir(f"calibration_{kind}_{ident}")  # resumable; reused while nothing changed
    train = store.examples_by_dataset(tokenizer, names, "train") if pinned is None else {}
    select = store.examples_by_dataset(tokenizer, names, FOLD_SELECT) if pinned is None else {}
    cal, runs = calibrate_by_finetuning(model, tokenizer, features, train, select, config, work, theta0=theta0,
                                        init_adapter=theta0_dir, n_subsets=0 if pinned is not None else n_subsets,
                                        size=size, pinned_lam=pinned, eval_batch_size=base_model.batch_size,
                                        log=context.log.info)
    table = cal.frame()
    at = cal.at_lam()
    steps, flops = sum(r["steps"] for r in runs.values()), sum(r["flops"] for r in runs.values())
    finetune_s = sum(r["train_s"] + r["eval_s"] for r in runs.values())
    record = {**cal.to_dict(), "kind": kind, "datasets": names, "theta0_dir": str(theta0_dir),
              "theta0_fingerprint": theta0_fingerprint, "projection_checksum": sidecar["projection_checksum"],
              "feature_settings": sidecar["settings"], "at_lam": at, "finetune_steps": steps, "finetune_flops": flops,
              "finetune_seconds": finetune_s, "max_steps": max_steps,
              "runs": runs}
    path = store.write_calibration(record, table, work)
    mlflow = mlflow_tracking.client_setup()
    with mlflow.start_run(run_name=context.asset_key.to_user_string()) as run:
        mlflow.set_tags({"grouplora.kind": "lam_calibration", "grouplora.theta0": theta0,
                         "grouplora.lam_source": cal.source, "dagster.run_id": context.run.run_id})
        mlflow.log_params({"theta0": theta0, "source": cal.source, "n_subsets": len(runs), "size": size,
                           "max_steps": max_steps, "n_datasets": len(names)})
        mlflow.log_metrics({"lam": cal.lam, "finetune_steps": steps, "finetune_flops": float(flops),
                            **{f"{k}_at_lam": float(v) for k, v in at.items()}})
        mlflow.log_artifact(str(store.calibration_csv(kind)))
        mlflow.log_artifact(str(path))
    seconds = time.perf_counter() - start
    context.log.info(f"λ = {cal.lam:g} ({cal.source}, θ0 = {theta0}) from {len(runs)} fine-tunes in {seconds:.1f}s"
                     + (f"; at λ: mean relative loss error {at['mean_relative_error_loss']:.3f}" if at else ""))
    if cal.at_grid_edge:
        context.log.warning(f"λ = {cal.lam:g} is at the edge of the grid {cal.grid}: the best λ may lie outside it")
    return dg.MaterializeResult(metadata={
        "lam": cal.lam, "source": cal.source, "theta0": theta0, "theta0_fingerprint": theta0_fingerprint,
        "error_table": dg.MetadataValue.md(table.round(4).to_markdown(index=False) if len(table) else
                                           "(pinned: no fine-tunes, no error table)"),
        **{f"{k}_at_lam": float(v) for k, v in at.items()},
        "subsets": dg.MetadataValue.json(cal.subsets), "n_finetunes": len(runs), "finetune_steps": steps,
        "finetune_flops": flops, "finetune_seconds": round(finetune_s, 2), "at_grid_edge": cal.at_grid_edge,
        "n_datasets": len(names), "seconds": round(seconds, 2), "mlflow_run_id": run.info.run_id,
        "path": dg.MetadataValue.path(str(path))})


@dg.asset(
    deps=[dg.AssetKey("gradient_features")],
    group_name="estimates",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    description="The estimator's λ for subset_estimates: a few random subsets really fine-tuned from the θ0 of "
                "gradient_features, λ with the lowest mean relative loss error on the selection fold (or pinned by "
                "EstimationSettings.lam); error table per λ as metadata and an MLflow artifact.",
    op_tags=GPU_OP_TAGS,  # trains
    pool=GPU_POOL,
)
def lam_calibration(context: dg.AssetExecutionContext, store: ArtifactStore, base_model: BaseModelResource,
                    gradient_settings: GradientSettings, estimation_settings: EstimationSettings,
                    training_settings: TrainingSettings, mlflow_tracking: MlflowResource) -> dg.MaterializeResult:
    s = estimation_settings
    theta0_dir, theta0 = store.features_theta0(base_model, gradient_settings)
    return run_calibration(context, store, base_model, training_settings, mlflow_tracking, kind=FEATURES,
                           theta0=theta0, theta0_dir=theta0_dir,
                           theta0_fingerprint=store.adapter_fingerprint(theta0_dir), pinned=s.lam,
                           n_subsets=s.calibration_subsets, size=s.calibration_size,
                           max_steps=s.calibration_max_steps)


@dg.asset(
    deps=[dg.AssetKey("meta_gradient_features"), dg.AssetKey("meta_init_adapter")],
    group_name="selection",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    description="The estimator's λ for target_selection: like lam_calibration, at θ0 = the meta-initialization "
                "(or pinned by SelectionSettings.lam).",
    op_tags=GPU_OP_TAGS,  # trains
    pool=GPU_POOL,
)
def meta_lam_calibration(context: dg.AssetExecutionContext, store: ArtifactStore, base_model: BaseModelResource,
                         estimation_settings: EstimationSettings, selection_settings: SelectionSettings,
                         training_settings: TrainingSettings, mlflow_tracking: MlflowResource) -> dg.MaterializeResult:
    meta = store.meta_init()
    s = estimation_settings  # how many fine-tunes and how long: one setting for both calibrations
    return run_calibration(context, store, base_model, training_settings, mlflow_tracking, kind=META_FEATURES,
                           theta0="meta_init", theta0_dir=store.meta_init_dir(), theta0_fingerprint=meta["fingerprint"],
                           pinned=selection_settings.lam, n_subsets=s.calibration_subsets, size=s.calibration_size,
                           max_steps=s.calibration_max_steps)

