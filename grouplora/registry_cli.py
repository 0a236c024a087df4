"""`grouplora promote` and `grouplora predict`: the MLflow-registered ensemble from a plain shell.

Both need only the MLflow store and the local model cache (no Dagster). The tracking URI comes from
--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<GROUPLORA_HOME or ./var>/mlflow/mlflow.db.
The lead registers them with `main.add_command(promote)` / `main.add_command(predict)`.
"""

from __future__ import annotations

import json
import os

import click

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TRACKING = click.option("--tracking-uri", default=None,
                        help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI or the project sqlite store).")


def _tracking(uri: str | None) -> str:
    from grouplora.orchestration.registry import default_tracking_uri

    return uri or default_tracking_uri()


@click.command("promote")
@click.option("--name", default="grouplora-ensemble", show_default=True, help="Registered model name.")
@click.option("--metric", default="val_accuracy", show_default=True, help="Version tag (or run metric) to compare.")
@click.option("--lower-is-better", is_flag=True, help="The metric is a loss: smaller wins.")
@TRACKING
def promote(name: str, metric: str, lower_is_better: bool, tracking_uri: str | None) -> None:
    """Make the `challenger` version the `champion` if it beats the current champion on --metric."""
    from grouplora.orchestration.registry import promote as do_promote

    r = do_promote(name, tracking_uri=_tracking(tracking_uri), metric=metric, higher_is_better=not lower_is_better)
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

    from grouplora.orchestration.registry import load_for_prediction

    if pairs and len(pairs) not in (1, len(texts)):
        raise click.BadParameter(f"give --text-pair once or once per --text ({len(texts)}), not {len(pairs)} times",
                                 param_hint="--text-pair")
    frame = pd.DataFrame({"dataset": [dataset] * len(texts), "text": list(texts)})
    if pairs:
        frame["text_pair"] = list(pairs) * len(texts) if len(pairs) == 1 else list(pairs)
    model = load_for_prediction(model_uri, tracking_uri=_tracking(tracking_uri))
    try:
        out = model.predict(frame)
    except ValueError as e:  # unknown dataset, bad input: a message, not a traceback
        raise click.ClickException(str(e)) from e
    for text, row in zip(texts, out.itertuples(index=False)):
        if as_json:
            click.echo(json.dumps({"dataset": dataset, "text": text, "label": row.label,
                                   "probability": round(float(row.probability), 6)}))
        else:
            click.echo(f"{row.label}\t{row.probability:.4f}")
