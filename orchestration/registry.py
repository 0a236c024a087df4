"""MLflow model registry for the served ensemble: log a version, promote it by alias, load it to predict.

A registered version is an MLflow models-from-code pyfunc: its code is `serving_model.py` (which sets an
`EnsembleModel`; nothing is pickled) and its single artifact is a folder with
`ensemble.json` and one sub-folder per adapter (adapter_config.json + adapter_model.safetensors, nothing
else: training checkpoints stay behind). The base model is NOT in the artifact: the JSON names it (e.g.
"smollm2-135m-instruct", loaded from the local model cache by `grouplora.ml.model.load_base_model`), and
the JSON's `base_fingerprint` checks that the loaded base is the one the adapters were trained on.

Promotion uses aliases only (no stages): `log_ensemble` points `challenger` at the new version and tags it
with its validation metrics (and the baselines' validation accuracy); `promote` moves `champion` to the challenger
iff it strictly beats every baseline tagged on it and the champion (or there is no champion yet), and tags the
version with the decision and its reason.

Class names: `DatasetSpec` has label words (what the model answers), not label values. The value returned
for class i of dataset D is `Ensemble.meta["classes"][D][i]`; without that entry it is label_words[i]
stripped of spaces.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema  # noqa: E402

from grouplora.ml.ensemble import Ensemble  # noqa: E402

ARTIFACT_KEY = "ensemble"
ENSEMBLE_JSON = "ensemble.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHALLENGER = "challenger"
CHAMPION = "champion"
EXPERIMENT = "grouplora"
DEFAULT_NAME = "grouplora-ensemble"
MODEL_CODE = Path(__file__).with_name("serving_model.py")  # what log_ensemble logs as the model

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "dataset"), ColSpec("string", "text"),
                   ColSpec("string", "text_pair", required=False)]),
    outputs=Schema([ColSpec("string", "dataset"), ColSpec("string", "label"), ColSpec("double", "probability")]),
    # merged: the merged adapter (one adapter's cost, an approximation) instead of the exact ensemble
    params=ParamSchema([ParamSpec("batch_size", "long", 16), ParamSpec("merged", "boolean", False)]),
)


# ------------------------------------------------------------------------------------------ tracking


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project store sqlite:///<GROUPLORA_HOME or ./var>/mlflow/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    from grouplora.orchestration.settings import home

    return f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}"


def _sqlite_file(tracking_uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix):]) if tracking_uri.startswith(prefix) else None


def use_tracking(tracking_uri: str) -> MlflowClient:
    """Point mlflow's tracking and registry at tracking_uri (creating a sqlite file's folder); its client."""
    db = _sqlite_file(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(client: MlflowClient, tracking_uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # Without an explicit location a sqlite store puts artifacts under the cwd: keep them next to the db,
    # where `grouplora ui` serves them from (<db folder>/artifacts).
    db = _sqlite_file(tracking_uri)
    location = (db.parent.resolve() / "artifacts").as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


# ------------------------------------------------------------------------------------------- pyfunc


def class_names(ensemble: Ensemble, dataset: str) -> list[str]:
    """Label values of the dataset's classes, in class order (meta["classes"][dataset] or the stripped label words)."""
    spec = ensemble.datasets[dataset]
    names = ensemble.meta.get("classes", {}).get(dataset)
    if names is None:
        return [w.strip() for w in spec.label_words]
    if len(names) != len(spec.label_words):
        raise ValueError(f"{dataset!r}: {len(names)} class names for {len(spec.label_words)} label words")
    return [str(n) for n in names]


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """The per-dataset weighted LoRA ensemble as an MLflow pyfunc.

    Input: a DataFrame with columns `dataset`, `text` and optionally `text_pair`. Output: a DataFrame with
    `dataset`, `label` (the predicted label value, see `class_names`) and `probability` (of that label),
    row for row. Params: batch_size (prompts per forward), merged (serve each dataset's merged adapter).
    The artifact holds the ensemble JSON and its adapters only; load_context loads the base model named in
    the JSON (by name, e.g. "smollm2-135m-instruct" from the local model cache, or "tiny"): it is not copied
    into the registry. Logged as code (serving_model.py), never pickled.
    """

    def load_context(self, context: Any) -> None:
        from grouplora.ml.model import load_base_model

        self.ensemble = Ensemble.load(Path(context.artifacts[ARTIFACT_KEY]) / ENSEMBLE_JSON)
        self.model, self.tokenizer = load_base_model(self.ensemble.base_model)
        # MLflow's server runs requests in threads; the adapters loaded on the one base (active adapter,
        # mixed-batch hooks, merged adapters) are shared state: one prediction at a time.
        self.lock = threading.Lock()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        with self.lock:
            return predict_frame(self.ensemble, self.model, self.tokenizer, model_input,
                                 batch_size=int(params.get("batch_size", 16)),
                                 merged=bool(params.get("merged", False)))


def predict_frame(ensemble: Ensemble, model: Any, tokenizer: Any, frame: pd.DataFrame, *,
                  batch_size: int = 16, merged: bool = False) -> pd.DataFrame:
    """EnsembleModel.predict without MLflow: one (dataset, label, probability) row per input row, in order.
    Each dataset's rows go through all its adapters in one pass (ml.ensemble.predict), or with merged=True
    through its merged adapter."""
    from grouplora.ml.ensemble import predict
    from grouplora.ml.prompts import render

    missing = {"dataset", "text"} - set(frame.columns)
    if missing:
        raise ValueError(f"input needs columns dataset and text (text_pair optional); missing {sorted(missing)}")
    frame = frame.reset_index(drop=True)
    known = sorted(ensemble.weights)
    unknown = sorted(set(frame["dataset"]) - set(known))
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; this ensemble knows {known}")
    labels = [""] * len(frame)
    probability = [0.0] * len(frame)
    pairs = frame["text_pair"] if "text_pair" in frame.columns else pd.Series([None] * len(frame))
    for dataset, rows in frame.groupby("dataset", sort=False).groups.items():
        spec = ensemble.datasets[dataset]
        if not spec.template:
            raise ValueError(f"dataset {dataset!r} has no prompt template in the ensemble JSON")
        idx = list(rows)
        prompts = [render(spec.template, str(frame.at[i, "text"]), _pair(pairs.iloc[i])) for i in idx]
        classes = class_names(ensemble, dataset)
        pred, probs = predict(ensemble, model, tokenizer, dataset, prompts, batch_size=batch_size, merged=merged)
        for j, i in enumerate(idx):
            labels[i] = classes[int(pred[j])]
            probability[i] = float(probs[j, int(pred[j])])
    return pd.DataFrame({"dataset": frame["dataset"].astype(str), "label": labels, "probability": probability})


def _pair(value: Any) -> str | None:
    # DataFrames carry a missing text_pair as None or NaN.
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


# ---------------------------------------------------------------------------------------- log & promote


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    run_id: str


@dataclass(frozen=True)
class PromotionResult:
    promoted: bool
    challenger_version: str | None
    champion_version: str | None  # the champion after this call
    challenger_value: float | None
    champion_value: float | None  # the metric of the champion before this call (None: there was none)
    reason: str


def stage_artifact(ensemble_path: Path, out: Path) -> Path:
    """Copy the ensemble into out/: ensemble.json with relative adapter paths + adapters/<i>/ (peft files only)."""
    ens = Ensemble.load(Path(ensemble_path))
    out.mkdir(parents=True, exist_ok=True)
    d = ens.to_dict()
    for i, a in enumerate(ens.adapters):
        src = ens.adapter_path(a.name)
        dst = out / "adapters" / f"{i:02d}"
        dst.mkdir(parents=True)
        for f in ADAPTER_FILES:
            if not (src / f).exists():
                raise FileNotFoundError(f"adapter {a.name!r}: {src / f} is missing")
            shutil.copy2(src / f, dst / f)
        # Index, not name: adapter names may hold characters that are not safe in a path.
        d["adapters"][i]["path"] = f"adapters/{i:02d}"
    (out / ENSEMBLE_JSON).write_text(json.dumps(d, indent=2))
    Ensemble.load(out / ENSEMBLE_JSON)  # validates the rewritten copy
    return out


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow does not infer them by loading the model in a subprocess at log time (slow).
    # grouplora itself must be importable where the model is loaded: it is not on PyPI, so not listed.
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "peft", "safetensors", "pandas")]


def log_ensemble(ensemble_path: Path, *, registered_name: str, tracking_uri: str, metrics: dict[str, float],
                 run_name: str = "ensemble", parent_run_id: str | None = None,
                 experiment: str = EXPERIMENT) -> ModelVersionInfo:
    """Log the ensemble JSON (+ adapters) as a pyfunc, register a new version, tag it with `metrics` and
    point the `challenger` alias at it. parent_run_id nests the run under that one (in its experiment)."""
    client = use_tracking(tracking_uri)
    tags = {"grouplora.kind": "ensemble"}
    if parent_run_id:
        exp_id = client.get_run(parent_run_id).info.experiment_id
        # A tag, not start_run(parent_run_id=): that one demands the parent run still be active.
        tags["mlflow.parentRunId"] = parent_run_id
    else:
        exp_id = experiment_id(client, tracking_uri, experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    with tempfile.TemporaryDirectory(prefix="grouplora-ensemble-") as tmp:
        folder = stage_artifact(Path(ensemble_path), Path(tmp) / ARTIFACT_KEY)
        ens = Ensemble.load(folder / ENSEMBLE_JSON)
        with mlflow.start_run(run_id=run.info.run_id):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            mlflow.log_params({"base_model": ens.base_model, "base_fingerprint": ens.base_fingerprint or "-",
                               "adapters": len(ens.adapters), "datasets": len(ens.datasets)})
            info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE),
                                           artifacts={ARTIFACT_KEY: str(folder)}, signature=SIGNATURE,
                                           pip_requirements=_pip_requirements(),
                                           registered_model_name=registered_name)
            # Tags and alias while the run is still RUNNING: crash recovery takes a version whose run ended
            # without them for a half-registered one (orchestration/recovery.py).
            version = str(info.registered_model_version)
            for k, v in metrics.items():
                client.set_model_version_tag(registered_name, version, k, str(float(v)))
            client.set_model_version_tag(registered_name, version, "base_model", ens.base_model)
            client.set_registered_model_alias(registered_name, CHALLENGER, version)
    return ModelVersionInfo(registered_name, version, run.info.run_id)


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metric(client: MlflowClient, mv: Any, metric: str) -> float | None:
    """The version's tag `metric`, else its run's logged metric; None when neither exists."""
    if metric in mv.tags:
        return float(mv.tags[metric])
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        return None if value is None else float(value)
    return None


# Validation accuracy of the baselines, tagged on each version by the ensemble's registration (when it has them):
# a challenger must beat each one present, as well as the champion.
BASELINES = {"val_zero_shot": "zero-shot", "val_one_adapter_all": "one adapter on all datasets"}
PROMOTION_TAG = "grouplora.promotion"


def promote(registered_name: str, *, tracking_uri: str, metric: str = "val_accuracy",
            higher_is_better: bool = True, version: str | None = None) -> PromotionResult:
    """Move `champion` to the challenger iff its `metric` strictly beats every baseline tagged on it (BASELINES;
    with the default metric) and the champion's, or there is no champion. The challenger is `version` when given
    (a pipeline run promotes the version it registered itself), else the version the `challenger` alias names.
    Nothing else changes; the decision and its reason are tagged on the challenger (PROMOTION_TAG)."""
    client = use_tracking(tracking_uri)
    client.get_registered_model(registered_name)  # a clear MlflowException when the name is unknown
    ch = client.get_model_version(registered_name, version) if version is not None else \
        _alias_version(client, registered_name, CHALLENGER)
    cur = _alias_version(client, registered_name, CHAMPION)
    cur_v = str(cur.version) if cur is not None else None  # the store may hand back ints
    cur_value = _metric(client, cur, metric) if cur is not None else None
    if ch is None:
        return PromotionResult(False, None, cur_v, None, cur_value, f"{registered_name} has no {CHALLENGER} alias")
    value = _metric(client, ch, metric)
    ch_v = str(ch.version)

    def decide(promoted: bool, reason: str) -> PromotionResult:
        client.set_model_version_tag(registered_name, ch_v, PROMOTION_TAG,
                                     f"{'promoted' if promoted else 'not promoted'}: {reason}")
        return PromotionResult(promoted, ch_v, ch_v if promoted else cur_v, value, cur_value, reason)

    def beats(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    if value is None or not math.isfinite(value):
        return decide(False, f"challenger v{ch_v} has no finite {metric} ({value})")
    if cur is not None and cur_v == ch_v:
        return PromotionResult(False, ch_v, cur_v, value, cur_value, f"v{ch_v} is already the champion")
    if metric == "val_accuracy":
        for tag, what in BASELINES.items():
            base = _metric(client, ch, tag)
            if base is not None and not (math.isfinite(base) and beats(value, base)):
                return decide(False, f"challenger v{ch_v} {metric}={value:g} does not beat the {what} baseline "
                                     f"({tag}={base:g})")
    if cur is not None:
        if cur_value is None or not math.isfinite(cur_value):
            return decide(False, f"champion v{cur_v} has no finite {metric} to compare with")
        if not beats(value, cur_value):
            return decide(False, f"challenger v{ch_v} {metric}={value:g} does not beat "
                                 f"champion v{cur_v} {metric}={cur_value:g}")
    client.set_registered_model_alias(registered_name, CHAMPION, ch_v)
    client.set_model_version_tag(registered_name, ch_v, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    before = "no champion before" if cur is None else f"beats v{cur_v} {metric}={cur_value:g}"
    baselines = [f"{tag}={_metric(client, ch, tag):g}" for tag in BASELINES
                 if metric == "val_accuracy" and _metric(client, ch, tag) is not None]
    return decide(True, f"v{ch_v} {metric}={value:g} promoted to {CHAMPION} ({before}"
                        + (f"; beats the baselines {', '.join(baselines)}" if baselines else "") + ")")


def alias_state(registered_name: str, *, tracking_uri: str, metric: str = "val_accuracy") -> dict[str, Any]:
    """Which versions hold `challenger` and `champion`, and their `metric` (read only: changes nothing)."""
    client = use_tracking(tracking_uri)
    out: dict[str, Any] = {}
    for alias in (CHALLENGER, CHAMPION):
        mv = _alias_version(client, registered_name, alias)
        out[f"{alias}_version"] = str(mv.version) if mv is not None else None
        out[f"{alias}_value"] = _metric(client, mv, metric) if mv is not None else None
    return out


def load_for_prediction(model_uri: str, *, tracking_uri: str | None = None) -> mlflow.pyfunc.PyFuncModel:
    """mlflow.pyfunc.load_model(model_uri), e.g. "models:/grouplora-ensemble@champion"."""
    if tracking_uri is not None:
        use_tracking(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri)
