"""The registry: every new ensemble becomes a model version with alias `challenger`; `champion` (the promotion
step, also `grouplora promote`) moves the `champion` alias to the version its run registered only if it beats the
baselines and the champion on validation; the `champion_gate` check reports whether the newest ensemble is the one
served, and changes nothing."""

import dagster as dg

from grouplora.orchestration.registry import BASELINES, alias_state, log_ensemble, promote
from grouplora.orchestration.resources import MlflowResource
from grouplora.orchestration.settings import EnsembleSettings
from grouplora.orchestration.store import ArtifactStore


@dg.asset(
    deps=[dg.AssetKey("ensemble")],
    group_name="ensemble",
    kinds={"mlflow"},
    code_version="1",
    description="The ensemble registered in the MLflow model registry as a pyfunc; the new version is `challenger`.",
)
def registered_ensemble(context: dg.AssetExecutionContext, store: ArtifactStore, mlflow_tracking: MlflowResource,
                        ensemble_settings: EnsembleSettings) -> dg.MaterializeResult:
    info = store.ensemble_info()
    # the ensemble's validation accuracy and, when the ensemble step measured them, the baselines' (promotion needs
    # the challenger to beat them too): version tags
    metrics = {k: info[k] for k in ("val_accuracy", *BASELINES) if info.get(k) is not None}
    version = log_ensemble(store.ensemble_dir() / "ensemble.json", registered_name=ensemble_settings.registered_name,
                           tracking_uri=mlflow_tracking.uri(), metrics=metrics,
                           parent_run_id=info["mlflow_run_id"], experiment=mlflow_tracking.experiment)
    uri = f"models:/{version.name}/{version.version}"
    context.log.info(f"registered {uri} as challenger (val_accuracy {info['val_accuracy']:.4f})")
    return dg.MaterializeResult(metadata={"model_uri": uri, "version": str(version.version), "alias": "challenger",
                                          **metrics, "mlflow_run_id": version.run_id})


def registered_version(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The model version that `registered_ensemble` registered in run `run_id`; else (promotion run on its own) the
    one its latest materialization registered; None if it never ran."""
    records = instance.fetch_materializations(dg.AssetKey("registered_ensemble"), limit=50).records
    mine = [r for r in records if r.run_id == run_id] or records[:1]
    if not mine or mine[0].asset_materialization is None:
        return None
    value = mine[0].asset_materialization.metadata.get("version")
    return None if value is None else str(value.value)


@dg.asset(
    deps=[registered_ensemble],
    group_name="ensemble",
    kinds={"mlflow"},
    code_version="1",
    description="Promotion: moves the `champion` alias to the version this run registered iff it strictly beats the "
                "baselines (zero-shot, one adapter on all datasets) and the champion on validation accuracy (or there "
                "is no champion yet); otherwise nothing changes. The reason is tagged on the version.",
)
def champion(context: dg.AssetExecutionContext, mlflow_tracking: MlflowResource,
             ensemble_settings: EnsembleSettings) -> dg.MaterializeResult:
    # The version registered by this run, not whatever `challenger` names now: another run may have moved it.
    version = registered_version(context.instance, context.run.run_id)
    if version is None:
        raise dg.Failure("registered_ensemble has never registered a version: materialize it first")
    result = promote(ensemble_settings.registered_name, tracking_uri=mlflow_tracking.uri(), version=version)
    context.log.info(("promoted: " if result.promoted else "not promoted: ") + result.reason)
    return dg.MaterializeResult(metadata={
        "promoted": result.promoted, "reason": result.reason, "champion_version": str(result.champion_version),
        "challenger_version": str(result.challenger_version), "champion_value": result.champion_value,
        "challenger_value": result.challenger_value})


@dg.asset_check(asset=champion, description="Reports whether the newest registered ensemble (challenger) is the "
                "champion; warns when it is not (it did not beat the champion). Reads the registry only.")
def champion_gate(context: dg.AssetCheckExecutionContext, mlflow_tracking: MlflowResource,
                  ensemble_settings: EnsembleSettings) -> dg.AssetCheckResult:
    state = alias_state(ensemble_settings.registered_name, tracking_uri=mlflow_tracking.uri())
    serves_newest = state["challenger_version"] is not None and state["champion_version"] == state["challenger_version"]
    return dg.AssetCheckResult(passed=bool(serves_newest), severity=dg.AssetCheckSeverity.WARN,
                               metadata={k: str(v) for k, v in state.items()})
