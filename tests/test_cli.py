"""The command line as an operator meets it: one line per problem, exit status 2 for bad input and 1 for anything
else, no traceback unless --debug; `grouplora run` with a bad file among good ones, after a dataset file is removed,
under a GROUPLORA_HOME with glob characters; `grouplora predict` with empty text or a model that is not there."""

from __future__ import annotations

import json
import os

import click
import pytest
from click.testing import CliRunner

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert "Traceback" not in output and "Stack Trace" not in output
    return lines[0]


def test_the_group_reports_each_failure_in_one_line(monkeypatch):
    """errors.Group around throwaway commands that fail as real ones do."""
    from grouplora.errors import Group
    from grouplora.ml.data_format import DatasetError

    @click.group(cls=Group)
    def cli():
        pass

    @cli.command()
    def bad_file():
        raise DatasetError("/data/reviews.csv", "empty text", row=3)

    @cli.command()
    def bug():
        raise RuntimeError("out of cheese\n  at line two")

    monkeypatch.delenv("GROUPLORA_DEBUG", raising=False)
    res = CliRunner().invoke(cli, ["bad-file"])
    assert res.exit_code == 2 and one_line(res.output) == "/data/reviews.csv, row 3: empty text"
    res = CliRunner().invoke(cli, ["bug"])
    assert res.exit_code == 1
    assert one_line(res.output) == "error: RuntimeError: out of cheese (rerun with --debug for the traceback)"
    monkeypatch.setenv("GROUPLORA_DEBUG", "1")
    res = CliRunner().invoke(cli, ["bug"])
    assert isinstance(res.exception, RuntimeError)  # --debug: the exception itself, traceback and all


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """GROUPLORA_* and DAGSTER_HOME set through monkeypatch, so what the CLI sets in this process is undone after."""
    home = tmp_path / "var"
    for k, v in {"GROUPLORA_HOME": home, "GROUPLORA_DATASETS": tmp_path / "datasets",
                 "DAGSTER_HOME": home / "dagster_home", "GROUPLORA_BASE_MODEL": "tiny"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GROUPLORA_DEBUG", raising=False)
    return tmp_path


def test_run_stops_at_a_broken_settings_file_and_a_bad_home(env, make_folder):
    from grouplora.cli import main

    folder = make_folder(env / "datasets")
    (folder / "datasets.yaml").write_text("datasets:\n  reviews:\n    split_fractions: [0.5, 0.2, 0.2]\n")
    res = CliRunner().invoke(main, ["run", "--datasets", str(folder)])
    assert res.exit_code == 2, res.output
    assert one_line(res.stderr) == (f"{folder / 'datasets.yaml'}: datasets.reviews.split_fractions must be three "
                                    "non-negative numbers summing to 1, got [0.5, 0.2, 0.2]")
    os.environ["GROUPLORA_HOME"] = str(env / "wh?at")
    res = CliRunner().invoke(main, ["run", "--datasets", str(folder)])
    assert res.exit_code == 2 and "contains '?', which DuckDB cannot use" in one_line(res.output)


def test_predict_refuses_empty_text_and_names_what_is_missing(env):
    from mlflow.tracking import MlflowClient

    from grouplora.registry_cli import predict

    runner = CliRunner()
    res = runner.invoke(predict, ["--dataset", "reviews", "--text", "fine", "--text", " \t "])
    assert res.exit_code == 2 and one_line(res.output) == "--text number 2 is empty: give the text to classify"

    db = env / "var" / "mlflow" / "mlflow.db"
    res = runner.invoke(predict, ["--dataset", "reviews", "--text", "a fine film"])
    assert res.exit_code == 2 and one_line(res.output).startswith(f"no MLflow store at {db}: run `grouplora run`")
    assert not db.exists()  # asking did not create an empty store

    db.parent.mkdir(parents=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    client.create_registered_model("grouplora-ensemble")
    for model, says in (("models:/nope@champion", "nope"), ("models:/grouplora-ensemble@champion", "champion"),
                        ("models:/grouplora-ensemble/7", "7")):
        res = runner.invoke(predict, ["--model", model, "--dataset", "reviews", "--text", "a fine film"])
        assert res.exit_code == 2, res.output
        line = one_line(res.output)
        assert line.startswith(f"{model}: ") and says in line.removeprefix(model), line


@pytest.mark.slow  # two tiny pipeline runs and a rerun: over a minute on 2 cores
def test_run_with_a_bad_file_then_a_removed_one_under_a_glob_home(env, make_folder, monkeypatch):
    """A header-only file fails alone (exit 2, one line naming it) while the four good datasets run through the
    ensemble; then removing one dataset file reruns the suite on the other three (it used to fail in task_partition
    with KeyError until the file was back); a home whose path has glob characters works throughout."""
    import dagster as dg
    import pandas as pd

    from grouplora.cli import main

    home = env / "runs[1]" / "var*"
    monkeypatch.setenv("GROUPLORA_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    folder = make_folder(env / "datasets", news=True)
    (folder / "empty.csv").write_text("text,label\n")
    runner = CliRunner()
    res = runner.invoke(main, ["run", "--datasets", str(folder)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "Stack Trace" not in res.output
    assert res.stderr.strip().splitlines()[-2:] == [
        "ok 4, failed 1", f"  {folder / 'empty.csv'}: no data rows (a header only)"]
    results = pd.read_parquet(home / "storage" / "ensemble" / "results.parquet")
    assert sorted(results["dataset"]) == ["facts", "news", "parity", "reviews"]
    stored = {p.name: p.read_bytes() for p in (home / "storage" / "datasets").iterdir()}

    (folder / "empty.csv").unlink()
    (folder / "news.csv").unlink()
    res = runner.invoke(main, ["run", "--datasets", str(folder)])
    assert res.exit_code == 0, res.output
    assert "left out from now on (file removed or unusable): news" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "ok 3, failed 0"
    spec = json.loads((home / "storage" / "partition" / "task_partition.json").read_text())
    assert spec["datasets"] == ["facts", "parity", "reviews"]
    results = pd.read_parquet(home / "storage" / "ensemble" / "results.parquet")
    assert sorted(results["dataset"]) == ["facts", "parity", "reviews"]
    assert {p.name: p.read_bytes() for p in (home / "storage" / "datasets").iterdir()} == stored  # nothing lost

    from grouplora.orchestration import run

    runs_before = len(run.get_instance().get_runs())
    res = runner.invoke(main, ["run", "--datasets", str(folder)])
    assert res.exit_code == 0, res.output
    assert "== suite-wide assets: current" in res.stdout and "== ensemble: current" in res.stdout
    assert len(run.get_instance().get_runs()) == runs_before  # a rerun with nothing new runs nothing
    assert not run.get_instance().get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
