"""Recovery after a crash, on a real (temporary) Dagster instance and MLflow sqlite store: a process killed with
-9 in the middle of a run leaves its Dagster run STARTED, its MLflow run RUNNING, a logged model PENDING and a
model version with no alias or metric; `recover` closes exactly those, and leaves a live process's alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import dagster as dg  # noqa: E402
from mlflow.entities import LoggedModelStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from grouplora.orchestration.recovery import (ORPHAN_TAG, OWNER_HOST, OWNER_PID, OWNER_START, owner_alive,  # noqa: E402
                                              owner_tags, process_start, recover, set_aside_orphaned_versions)

NAME = "grouplora-ensemble"

# One step of a pipeline run, as the adapter/ensemble assets and log_ensemble do it, that then hangs: a Dagster run
# owned by this process; inside it an MLflow run tagged with the Dagster run id, a logged model (PENDING until
# finalized) and a registered model version without its tags or alias yet.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import dagster as dg
    from mlflow.tracking import MlflowClient
    from grouplora.orchestration.recovery import owner_tags

    uri, marker = sys.argv[1], sys.argv[2]

    @dg.op
    def register(context):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.get_experiment_by_name("grouplora").experiment_id
        run = client.create_run(exp, run_name="ensemble", tags={"dagster.run_id": context.run_id})
        client.log_metric(run.info.run_id, "val_accuracy", 0.7)
        model = client.create_logged_model(exp, name="model", source_run_id=run.info.run_id)
        mv = client.create_model_version("%s", source=run.info.artifact_uri + "/model", run_id=run.info.run_id)
        with open(marker + ".tmp", "w") as f:
            json.dump({"dagster": context.run_id, "mlflow": run.info.run_id, "model": model.model_id,
                       "version": str(mv.version)}, f)
        os.replace(marker + ".tmp", marker)
        time.sleep(600)

    @dg.job
    def fit():
        register()

    with dg.DagsterInstance.get() as instance:
        fit.execute_in_process(instance=instance, tags=owner_tags())
""" % NAME)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_owner_alive_tells_live_dead_reused_and_unknown():
    assert owner_alive(owner_tags()) is True
    assert owner_alive(owner_tags(dead_pid())) is False
    reused = {**owner_tags(), OWNER_START: str(int(process_start(os.getpid())) - 1)}  # same pid, other process
    assert owner_alive(reused) is False
    assert owner_alive({**owner_tags(), OWNER_HOST: socket.gethostname() + "-elsewhere"}) is None
    assert owner_alive({}) is None and owner_alive({OWNER_PID: "x"}) is None


@pytest.fixture()
def stores(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("grouplora", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model(NAME)
    with dg.DagsterInstance.get() as instance:  # created here, once: concurrent first use races (see locks.py)
        yield instance, client, uri


def finished_version(client: MlflowClient, tags: dict[str, str], alias: str | None = None) -> str:
    exp = client.get_experiment_by_name("grouplora").experiment_id
    run = client.create_run(exp, run_name="done")
    client.set_terminated(run.info.run_id, "FINISHED")
    mv = client.create_model_version(NAME, source=run.info.artifact_uri + "/model", run_id=run.info.run_id, tags=tags)
    if alias:
        client.set_registered_model_alias(NAME, alias, mv.version)
    return str(mv.version)


def test_recover_closes_what_a_killed_process_left_and_nothing_else(tmp_path, stores):
    instance, client, uri = stores
    champion = finished_version(client, {"val_accuracy": "0.8", "base_model": "tiny"}, alias="champion")
    superseded = finished_version(client, {"val_accuracy": "0.6", "base_model": "tiny"})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    markers = {k: tmp_path / f"{k}.json" for k in ("killed", "live")}
    procs = {k: subprocess.Popen([sys.executable, "-c", CHILD, uri, str(m)], env=env, stderr=subprocess.PIPE,
                                 text=True) for k, m in markers.items()}
    try:
        deadline = time.monotonic() + 300
        while not all(m.exists() for m in markers.values()):
            for k, p in procs.items():
                assert p.poll() is None, f"{k} child exited: {p.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "children never reached their hang"
            time.sleep(0.2)
        ids = {k: json.loads(m.read_text()) for k, m in markers.items()}

        assert not recover(instance, client, registered_name=NAME)  # both alive: nothing to do

        procs["killed"].send_signal(signal.SIGKILL)
        procs["killed"].wait()
        k, live = ids["killed"], ids["live"]
        assert instance.get_run_by_id(k["dagster"]).status == dg.DagsterRunStatus.STARTED  # what a kill leaves
        assert client.get_run(k["mlflow"]).info.status == "RUNNING"

        report = recover(instance, client, registered_name=NAME)
        assert report.dagster_runs_failed == [k["dagster"]]
        assert report.mlflow_runs_killed == [k["mlflow"]]
        assert report.logged_models_failed == [k["model"]]
        assert report.versions_orphaned == [f"{NAME}/{k['version']}"]
        assert any("marked failed" in line for line in report.lines())

        assert instance.get_run_by_id(k["dagster"]).status == dg.DagsterRunStatus.FAILURE
        assert client.get_run(k["mlflow"]).info.status == "KILLED"
        assert client.get_logged_model(k["model"]).status == LoggedModelStatus.FAILED
        assert "no val_accuracy, base_model tag" in client.get_model_version(NAME, k["version"]).tags[ORPHAN_TAG]
        # the live process's run, model and version, and the finished versions, are untouched
        assert instance.get_run_by_id(live["dagster"]).status == dg.DagsterRunStatus.STARTED
        assert client.get_run(live["mlflow"]).info.status == "RUNNING"
        assert client.get_logged_model(live["model"]).status == LoggedModelStatus.PENDING
        for v in (live["version"], champion, superseded):
            assert ORPHAN_TAG not in client.get_model_version(NAME, v).tags
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == champion

        assert not recover(instance, client, registered_name=NAME)  # idempotent
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


def test_unowned_runs_are_left_alone_unless_old_enough(stores):
    instance, client, _ = stores

    @dg.op
    def noop():
        return 1

    @dg.job
    def job():
        noop()

    run = instance.create_run_for_job(job, run_config={})  # no owner tags: e.g. one a daemon launched
    exp = client.get_experiment_by_name("grouplora").experiment_id
    mlrun = client.create_run(exp, run_name="unowned")
    assert not recover(instance, client)
    report = recover(instance, client, unowned_older_than_s=0.0)
    assert report.dagster_runs_failed == [run.run_id] and report.mlflow_runs_killed == [mlrun.info.run_id]
    assert client.get_run(mlrun.info.run_id).info.status == "KILLED"


def test_orphaned_versions_can_be_deleted_keeping_a_note_on_the_run(stores):
    _, client, _ = stores
    half = finished_version(client, {"val_accuracy": "0.5"})  # died before base_model and the alias
    run_id = client.get_model_version(NAME, half).run_id
    assert set_aside_orphaned_versions(client, NAME, delete=True) == [f"{NAME}/{half}"]
    assert [v.version for v in client.search_model_versions(f"name = '{NAME}'")] == []
    assert "no base_model tag" in client.get_run(run_id).data.tags[f"{ORPHAN_TAG}.deleted_version"]


# A run as a daemon launches it: no owner tags; the run worker records its pid the way `dagster api execute_run`
# does (an engine event "Started process for run (pid: N)." with the pid as metadata), then hangs.
DAEMON_CHILD = textwrap.dedent("""
    import os, sys, time
    import dagster as dg
    from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData

    @dg.op
    def noop():
        return 1

    @dg.job
    def daemon_job():
        noop()

    with dg.DagsterInstance.get() as instance:
        run = instance.create_run_for_job(daemon_job, run_config={})
        pid = os.getpid()
        instance.report_engine_event(f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid))
        instance.report_dagster_event(DagsterEvent(event_type_value=DagsterEventType.RUN_START.value,
                                                   job_name=run.job_name), run_id=run.run_id)
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(run.run_id)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(600)
""")


def test_daemon_launched_runs_by_their_recorded_worker_pid(tmp_path, stores):
    from grouplora.orchestration.recovery import fail_stale_runs, local_worker_alive, worker_pid

    instance, _, _ = stores
    markers = {k: tmp_path / f"{k}.id" for k in ("killed", "live")}
    procs = {k: subprocess.Popen([sys.executable, "-c", DAEMON_CHILD, str(m)], stderr=subprocess.PIPE, text=True)
             for k, m in markers.items()}
    try:
        deadline = time.monotonic() + 300
        while not all(m.exists() for m in markers.values()):
            for k, p in procs.items():
                assert p.poll() is None, f"{k} child exited: {p.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        ids = {k: m.read_text() for k, m in markers.items()}
        assert worker_pid(instance, ids["killed"]) == procs["killed"].pid
        procs["killed"].send_signal(signal.SIGKILL)
        procs["killed"].wait()
        assert fail_stale_runs(instance) == []  # no owner tags: unknown without local_workers
        assert fail_stale_runs(instance, local_workers=True) == [ids["killed"]]
        assert instance.get_run_by_id(ids["killed"]).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(ids["live"]).status == dg.DagsterRunStatus.STARTED
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    assert local_worker_alive(os.getpid(), time.time()) is True
    assert local_worker_alive(os.getpid(), time.time() - 10 * 24 * 3600) is False  # a pid reused since
    assert local_worker_alive(dead_pid(), time.time()) is False
