"""One GROUPLORA_HOME shared by several processes (orchestration/home.py): concurrent first starts on a new home all
succeed and leave it working; a second run waits for the first, saying so; what a killed process left is closed on
the next start (the CLI's check) and by the daemon's sensor. Real Dagster instances and MLflow sqlite stores."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import dagster as dg  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from grouplora.orchestration.locks import LockTimeout  # noqa: E402
from grouplora.orchestration.recovery import owner_tags  # noqa: E402


@pytest.fixture()
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("GROUPLORA_HOME", str(path))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield path
    os.environ.pop("DAGSTER_HOME", None)  # run.dagster_home() sets it for the process


def uri_of(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"


# What the start of every command does (open_home), in a fresh process; imports first, then all start at once.
START = textwrap.dedent("""
    import os, sys, time
    from grouplora.orchestration.home import open_home
    open(sys.argv[2], "w").close()
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.005)
    open_home(sys.argv[1], registered_name="grouplora-ensemble")
    print("ok")
""")


def test_concurrent_first_starts_on_a_new_home(home, tmp_path):
    """Three commands starting together on a new home: without the init lock this broke the home for good (two
    alembic heads, "database is locked": benchmarks/results/init_race.json)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", START, uri_of(home), str(r), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert sum("waiting for another grouplora process" in err for _, err in outs) >= 1  # they met at the lock
    # the home works: its instance and store open, and a run can be recorded in each
    from grouplora.orchestration import run

    instance = run.get_instance()
    assert instance.get_runs(limit=1) == []
    client = MlflowClient(tracking_uri=uri_of(home))
    exp = client.get_experiment_by_name("grouplora")
    client.set_terminated(client.create_run(exp.experiment_id).info.run_id, "FINISHED")
    assert instance.run_monitoring_enabled and instance.run_monitoring_start_timeout_seconds == 300


HOLD = textwrap.dedent("""
    import sys, time
    from grouplora.orchestration.home import exclusive_run
    with exclusive_run():
        open(sys.argv[1], "w").close()
        time.sleep(float(sys.argv[2]))
        open(sys.argv[1] + ".done", "w").close()
""")


def test_a_second_run_on_a_home_waits_and_says_why(home, tmp_path, monkeypatch):
    from grouplora.orchestration.home import exclusive_run

    marker = tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(marker), "4"])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.05)
        monkeypatch.setenv("GROUPLORA_LOCK_TIMEOUT", "0.3")
        said = []
        with pytest.raises(LockTimeout, match=r"\.run\.lock: still locked after 0.3s by pid"):
            with exclusive_run(notify=said.append):
                pass
        assert len(said) == 1 and f"another grouplora run is using {home}" in said[0] and f"pid {holder.pid}" in said[0]
        monkeypatch.setenv("GROUPLORA_LOCK_TIMEOUT", "120")
        said.clear()
        with exclusive_run(notify=said.append):
            assert Path(f"{marker}.done").exists()  # only once the first one is done
        assert len(said) == 1 and "waiting for it to finish" in said[0]
    finally:
        holder.kill()
        holder.wait()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@dg.op
def step():
    return 1


@dg.job
def pipeline():
    step()


def started_run(instance: dg.DagsterInstance, tags: dict[str, str], worker_pid: int | None = None) -> str:
    """A run left STARTED, as a kill -9 leaves it: by a CLI (owner tags) or a daemon's run worker (its pid)."""
    from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData

    run = instance.create_run_for_job(pipeline, run_config={}, tags=tags)
    if worker_pid is not None:
        instance.report_engine_event(f"Started process for run (pid: {worker_pid}).", run,
                                     EngineEventData.in_process(worker_pid))
    instance.report_dagster_event(DagsterEvent(event_type_value=DagsterEventType.RUN_START.value,
                                               job_name=run.job_name), run_id=run.run_id)
    return run.run_id


def test_what_a_killed_process_left_is_closed_on_the_next_start_and_by_the_sensor(home):
    from grouplora.orchestration.home import open_home
    from grouplora.orchestration.resources import MlflowResource
    from grouplora.orchestration.sensors import stale_runs_sensor
    from grouplora.orchestration.settings import EnsembleSettings

    instance, report = open_home(uri_of(home))
    assert not report
    cli_run = started_run(instance, owner_tags(dead_pid()))  # a `grouplora run` killed with -9
    live_run = started_run(instance, owner_tags())  # this process: alive
    daemon_run = started_run(instance, {}, worker_pid=dead_pid())  # a daemon's run worker killed with -9
    client = MlflowClient(tracking_uri=uri_of(home))
    exp = client.get_experiment_by_name("grouplora").experiment_id
    training = client.create_run(exp, tags={"dagster.run_id": cli_run}).info.run_id  # RUNNING inside the killed run

    instance, report = open_home(uri_of(home))  # the next `grouplora run`
    assert report.dagster_runs_failed == [cli_run] and report.mlflow_runs_killed == [training]
    assert instance.get_run_by_id(cli_run).status == dg.DagsterRunStatus.FAILURE
    assert client.get_run(training).info.status == "KILLED"
    assert instance.get_run_by_id(live_run).status == dg.DagsterRunStatus.STARTED
    assert instance.get_run_by_id(daemon_run).status == dg.DagsterRunStatus.STARTED  # no owner tags: the daemon's

    # the daemon's own check (`grouplora ui` runs it every 2 minutes) finds its dead worker's run
    context = dg.build_sensor_context(instance=instance, resources={
        "mlflow_tracking": MlflowResource(tracking_uri=uri_of(home)), "ensemble_settings": EnsembleSettings()})
    skip = stale_runs_sensor(context)
    assert isinstance(skip, dg.SkipReason) and "1 Dagster run(s) marked failed" in skip.skip_message
    assert instance.get_run_by_id(daemon_run).status == dg.DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(live_run).status == dg.DagsterRunStatus.STARTED
    assert "nothing left behind" in stale_runs_sensor(context).skip_message
