"""`grouplora promote` and `grouplora predict`: the MLflow-registered ensemble from a plain shell.

Both need only the MLflow store and the local model cache (no Dagster). The tracking URI comes from
--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<GROUPLORA_HOME or ./var>/mlflow/mlflow.db.
The lead registers them with `main.add_command(promote)` / `main.add_command(predict)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from grouplora.errors import BadInput, first_line

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TRACKING = click.option("--tracking-uri", default=None,
                        help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI or the project sqlite store).")


def _tracking(uri: str | None) -> str:
    from grouplora.orchestration.registry import default_tracking_uri

    return uri or default_tracking_uri()


def _open_store(tracking_uri: str | None, registered_name: str | None = None) -> str:
    """The tracking URI, once its store is known to exist (a missing one is a one-line error, not a new empty
    store). The project's own store is opened under the home's init lock, after a crash's leftovers are set aside."""
    from grouplora.orchestration import settings
    from grouplora.orchestration.home import open_home

    uri = _tracking(tracking_uri)
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None and not db.is_file():
        raise BadInput(f"no MLflow store at {db}: run `grouplora run` first, or point --tracking-uri "
                       "(or MLFLOW_TRACKING_URI) at one")
    if uri == f"sqlite:///{settings.home() / 'mlflow' / 'mlflow.db'}":
        open_home(uri, dagster=False, registered_name=registered_name, notify=lambda m: click.echo(m, err=True))
    return uri


@click.command("promote")
@click.option("--name", default="grouplora-ensemble", show_default=True, help="Registered model name.")
@click.option("--metric", default="val_accuracy", show_default=True, help="Version tag (or run metric) to compare.")
@click.option("--lower-is-better", is_flag=True, help="The metric is a loss: smaller wins.")
@TRACKING
def promote(name: str, metric: str, lower_is_better: bool, tracking_uri: str | None) -> None:
    """Make the `challenger` version the `champion` if it beats the baselines tagged on it (zero-shot, one adapter on
    all datasets) and the current champion on --metric; the reason is printed and tagged on the version."""
    from mlflow.exceptions import MlflowException

    from grouplora.orchestration.registry import promote as do_promote

    uri = _open_store(tracking_uri, name)
    try:
        r = do_promote(name, tracking_uri=uri, metric=metric, higher_is_better=not lower_is_better)
    except MlflowException as e:  # e.g. no model of that name
        raise BadInput(f"{name}: {first_line(e.message)}") from None
    click.echo(("promoted: " if r.promoted else "not promoted: ") + r.reason)
    click.echo(f"champion: {'v' + r.champion_version if r.champion_version else 'none'}")


@click.command("predict")
@click.option("--model", "model_uri", default="models:/grouplora-ensemble@champion", show_default=True,
              help="MLflow model URI.")
@click.option("--dataset", required=True, help="Dataset whose weights, prompt and classes to use.")
@click.option("--text", "texts", multiple=True, required=True, help="Text to classify (repeatable).")
@click.option("--text-pair", "pairs", multiple=True,
              help="Second text (NLI hypothesis, ...): once for every --text, or once per --text in order.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per text.")
@TRACKING
def predict(model_uri: str, dataset: str, texts: tuple[str, ...], pairs: tuple[str, ...], as_json: bool,
            tracking_uri: str | None) -> None:
    """Print the predicted label and its probability for each --text, one line each."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from grouplora.orchestration.registry import load_for_prediction

    if pairs and len(pairs) not in (1, len(texts)):
        raise click.BadParameter(f"give --text-pair once or once per --text ({len(texts)}), not {len(pairs)} times",
                                 param_hint="--text-pair")
    empty = [i for i, t in enumerate(texts, start=1) if not t.strip()]
    if empty:
        raise BadInput(f"--text number {empty[0]} is empty: give the text to classify")
    frame = pd.DataFrame({"dataset": [dataset] * len(texts), "text": list(texts)})
    if pairs:
        frame["text_pair"] = list(pairs) * len(texts) if len(pairs) == 1 else list(pairs)
    uri = _open_store(tracking_uri)
    try:
        model = load_for_prediction(model_uri, tracking_uri=uri)
    except MlflowException as e:  # no such model, version or alias
        raise BadInput(f"{model_uri}: {first_line(e.message)}") from None
    except OSError as e:  # the version's artifacts are gone
        raise BadInput(f"{model_uri}: cannot load its files: {first_line(str(e))}") from None
    try:
        out = model.predict(frame)
    except (ValueError, MlflowException) as e:  # unknown dataset, bad input: a message, not a traceback
        raise BadInput(first_line(getattr(e, "message", None) or str(e))) from None
    for text, row in zip(texts, out.itertuples(index=False)):
        if as_json:
            click.echo(json.dumps({"dataset": dataset, "text": text, "label": row.label,
                                   "probability": round(float(row.probability), 6)}))
        else:
            click.echo(f"{row.label}\t{row.probability:.4f}")
