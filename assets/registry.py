"""The registry: every new ensemble becomes a model version with alias `challenger`; the champion gate
(an asset check, also `grouplora promote`) moves `champion` to it only if it wins on validation."""

import json

import dagster as dg

from grouplora.assets.ensemble import ensemble
from grouplora.orchestration.registry import log_ensemble, promote
from grouplora.orchestration.resources import EnsembleSettings, MlflowResource, StorageResource


@dg.asset(
    deps=[ensemble],
    group_name="ensemble",
    kinds={"mlflow"},
    code_version="1",
    description="The ensemble registered in the MLflow model registry as a pyfunc; the new version is `challenger`.",
)
def registered_ensemble(context: dg.AssetExecutionContext, storage: StorageResource, mlflow_tracking: MlflowResource,
                        ensemble_settings: EnsembleSettings) -> dg.MaterializeResult:
    info = json.loads(storage.path("ensemble", "current", ".json").read_text())
    version = log_ensemble(storage.path("ensemble", "current", "") / "ensemble.json",
                           registered_name=ensemble_settings.registered_name,
                           tracking_uri=mlflow_tracking.tracking_uri, metrics={"val_accuracy": info["val_accuracy"]},
                           parent_run_id=info["mlflow_run_id"], experiment=mlflow_tracking.experiment)
    uri = f"models:/{version.name}/{version.version}"
    context.log.info(f"registered {uri} as challenger (val_accuracy {info['val_accuracy']:.4f})")
    return dg.MaterializeResult(metadata={"model_uri": uri, "version": str(version.version), "alias": "challenger",
                                          "val_accuracy": info["val_accuracy"], "mlflow_run_id": version.run_id})


@dg.asset_check(asset=registered_ensemble, description="Promote the challenger to champion only if it beats the "
                "current champion on validation accuracy (warns when it does not).")
def champion_gate(context: dg.AssetCheckExecutionContext, mlflow_tracking: MlflowResource,
                  ensemble_settings: EnsembleSettings) -> dg.AssetCheckResult:
    result = promote(ensemble_settings.registered_name, tracking_uri=mlflow_tracking.tracking_uri)
    return dg.AssetCheckResult(
        passed=bool(result.promoted or result.challenger_version == result.champion_version),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"promoted": result.promoted, "reason": result.reason,
                  "champion_version": str(result.champion_version), "challenger_version": str(result.challenger_version),
                  "champion_value": result.champion_value, "challenger_value": result.challenger_value})
