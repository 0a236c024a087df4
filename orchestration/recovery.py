"""Clean up after a crash (kill -9, out of memory, power loss) so that nothing half-made stays visible.

A killed `grouplora run` leaves its Dagster run STARTED forever, its MLflow runs RUNNING, a logged model PENDING,
and, when it died inside registration, a model version with no alias and no metric. `recover` finds those and
closes them: Dagster runs marked failed, MLflow runs terminated as KILLED, logged models finalized as FAILED,
half-registered model versions tagged `grouplora.orphaned` (or deleted). It only touches what belongs to a process
that is gone, so it is safe while other grouplora processes are running.

Ownership: whoever starts a Dagster run or an MLflow run tags it with `owner_tags()` (pid, host, and the
process's start time, which tells a dead owner from a new process that reuses its pid). An MLflow run without
owner tags is judged by the Dagster run named in its `dagster.run_id` tag (its own or its parent run's), as the
adapter and ensemble assets set it: finished or failed Dagster run, dead MLflow run. A Dagster run a daemon
launched has no owner tags; its worker records "Started process for run (pid: N)", and with `local_workers=True`
(runs launched on this machine, as `grouplora ui` does) that pid is its owner, alive only if that process started
before the run did. Dagster's own run monitoring does not catch these: with the DefaultRunLauncher it cannot check
a run worker's health, only start timeouts and max runtimes. What has no owner at all is left alone unless
`unowned_older_than_s` says how old such a run must be to count as dead. Pure functions over a DagsterInstance
and an MlflowClient.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OWNER_PID = "grouplora/owner_pid"
OWNER_HOST = "grouplora/owner_host"
OWNER_START = "grouplora/owner_start"
ORPHAN_TAG = "grouplora.orphaned"
RECOVERED_TAG = "grouplora.recovered"
DAGSTER_RUN_TAG = "dagster.run_id"
PARENT_TAG = "mlflow.parentRunId"
REQUIRED_VERSION_TAGS = ("val_accuracy", "base_model")  # what orchestration.registry.log_ensemble sets last


# ------------------------------------------------------------------------------------------------ owners


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None if there is no such process.
    Where /proc is missing, "?" for a live pid (then only liveness is known, not pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]  # field 22; the command name may hold spaces
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"


def process_start_epoch(pid: int) -> float | None:
    """When the process started (seconds since the epoch), from /proc; None if gone or unknown (no /proc)."""
    ticks = process_start(pid)
    if ticks is None or ticks == "?":
        return None
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + int(ticks) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError):
        return None


def owner_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming this process (or `pid`) as the owner of a run."""
    pid = os.getpid() if pid is None else pid
    return {OWNER_PID: str(pid), OWNER_HOST: socket.gethostname(), OWNER_START: process_start(pid) or "?"}


def owner_alive(tags: Mapping[str, str]) -> bool | None:
    """True/False when the tags name an owner on this host that is alive/gone; None when they name none, or one
    on another host (nothing can be known from here)."""
    pid = tags.get(OWNER_PID)
    if pid is None or not pid.isdigit():
        return None
    if tags.get(OWNER_HOST) != socket.gethostname():
        return None
    start = process_start(int(pid))
    if start is None:
        return False
    recorded = tags.get(OWNER_START, "?")
    return start == "?" or recorded == "?" or start == recorded


# ------------------------------------------------------------------------------------------------ dagster


@dataclass
class RecoveryReport:
    """What `recover` changed: one entry per object, each with its reason."""

    dagster_runs_failed: list[str] = field(default_factory=list)
    mlflow_runs_killed: list[str] = field(default_factory=list)
    logged_models_failed: list[str] = field(default_factory=list)
    versions_orphaned: list[str] = field(default_factory=list)  # "name/version"

    def lines(self) -> list[str]:
        out = []
        for what, items in (("Dagster run(s) marked failed", self.dagster_runs_failed),
                            ("MLflow run(s) closed as KILLED", self.mlflow_runs_killed),
                            ("logged model(s) marked FAILED", self.logged_models_failed),
                            ("half-registered model version(s) set aside", self.versions_orphaned)):
            if items:
                out.append(f"{len(items)} {what}: {', '.join(items)}")
        return out

    def __bool__(self) -> bool:
        return bool(self.dagster_runs_failed or self.mlflow_runs_killed or self.logged_models_failed
                    or self.versions_orphaned)


def _unowned_dead(age_s: float | None, older_than_s: float | None) -> bool:
    return older_than_s is not None and age_s is not None and age_s > older_than_s


def worker_pid(instance: Any, run_id: str) -> int | None:
    """The pid a run worker recorded when it started ("Started process for run (pid: N)."), the last one if the
    run was resumed; None if it recorded none (e.g. a run executed in the calling process)."""
    import dagster as dg

    pid = None
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = entry.dagster_event
        if event is None or not (event.message or "").startswith(("Started process for run",
                                                                  "Started process for resuming")):
            continue
        value = (event.engine_event_data.metadata or {}).get("pid") if event.engine_event_data else None
        if value is not None and str(value.value).isdigit():
            pid = int(value.value)
    return pid


def local_worker_alive(pid: int, run_started: float) -> bool | None:
    """Whether the run worker `pid` on this machine still runs: a live process that started before the run
    (slack 5 s) is it; a later one reuses its pid. None where /proc cannot tell."""
    start = process_start_epoch(pid)
    if start is None:
        return False if process_start(pid) is None else None
    return start <= run_started + 5


def fail_stale_runs(instance: Any, *, local_workers: bool = False,
                    unowned_older_than_s: float | None = None) -> list[str]:
    """Mark failed every Dagster run that is not finished and whose owner process is gone; returns their ids.
    Owner: the run's owner tags; else, with local_workers, the pid its run worker recorded. Runs with neither
    count as gone only when `unowned_older_than_s` is set and they are older."""
    import dagster as dg

    statuses = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
                dg.DagsterRunStatus.CANCELING]
    failed = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=statuses)):
        run = record.dagster_run
        started = record.start_time or record.create_timestamp.timestamp()
        alive = owner_alive(run.tags)
        pid = worker_pid(instance, run.run_id) if alive is None and local_workers else None
        if pid is not None:
            alive = local_worker_alive(pid, started)
        if alive is None:
            alive = not _unowned_dead(time.time() - started, unowned_older_than_s)
        if alive:
            continue
        who = (f"pid {run.tags[OWNER_PID]} on {run.tags.get(OWNER_HOST)}" if OWNER_PID in run.tags
               else f"run worker pid {pid}" if pid is not None else "no owner recorded")
        instance.report_run_failed(run, message=f"grouplora: the process that ran this run ({who}) is gone "
                                                "(killed or crashed); marked failed on a later start")
        failed.append(run.run_id)
    return failed


# ------------------------------------------------------------------------------------------------- mlflow


def _experiments(client: Any, experiment_ids: Iterable[str] | None) -> list[str]:
    if experiment_ids is not None:
        return list(experiment_ids)
    return [e.experiment_id for e in client.search_experiments()]


def _paged(fetch) -> list[Any]:
    out, token = [], None
    while True:
        page = fetch(token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def _dagster_run_finished(instance: Any, run_id: str) -> bool | None:
    run = instance.get_run_by_id(run_id) if instance is not None else None
    if run is None:
        return None
    if run.is_finished:
        return True
    alive = owner_alive(run.tags)
    return None if alive is None else not alive


def mlflow_run_alive(client: Any, run: Any, instance: Any = None) -> bool | None:
    """Whether the process behind an MLflow run is alive: its owner tags, else its (or its parent's) Dagster run
    (finished means dead); None when nothing tells."""
    for r in (run, _parent(client, run)):
        if r is None:
            continue
        own = owner_alive(r.data.tags)
        if own is not None:
            return own
        if DAGSTER_RUN_TAG in r.data.tags:
            finished = _dagster_run_finished(instance, r.data.tags[DAGSTER_RUN_TAG])
            if finished is not None:
                return not finished
    return None


def _parent(client: Any, run: Any) -> Any:
    parent = run.data.tags.get(PARENT_TAG)
    if not parent:
        return None
    try:
        return client.get_run(parent)
    except Exception:  # a deleted parent: nothing to learn from it
        return None


def kill_stale_mlflow_runs(client: Any, instance: Any = None, *, experiment_ids: Iterable[str] | None = None,
                           unowned_older_than_s: float | None = None) -> list[str]:
    """Terminate as KILLED every RUNNING MLflow run whose process is gone (see mlflow_run_alive); returns ids."""
    killed = []
    for exp in _experiments(client, experiment_ids):
        runs = _paged(lambda token: client.search_runs([exp], "attributes.status = 'RUNNING'", page_token=token))
        for run in runs:
            alive = mlflow_run_alive(client, run, instance)
            if alive is None:
                alive = not _unowned_dead(time.time() - run.info.start_time / 1000, unowned_older_than_s)
            if alive:
                continue
            client.set_tag(run.info.run_id, RECOVERED_TAG, "its process was gone: closed as KILLED on a later start")
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    return killed


def _run_status(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id).info.status
    except Exception:  # the run was deleted
        return None


def fail_pending_logged_models(client: Any, *, experiment_ids: Iterable[str] | None = None) -> list[str]:
    """Finalize as FAILED every PENDING logged model whose source run is no longer RUNNING; returns model ids.
    (Run kill_stale_mlflow_runs first: a dead run is RUNNING until then.)"""
    from mlflow.entities import LoggedModelStatus

    exps = _experiments(client, experiment_ids)
    if not exps:
        return []
    failed = []
    models = _paged(lambda token: client.search_logged_models(exps, page_token=token))
    for m in models:
        if m.status != LoggedModelStatus.PENDING or _run_status(client, m.source_run_id) == "RUNNING":
            continue
        client.set_logged_model_tags(m.model_id, {RECOVERED_TAG: "its run ended before the model was finalized"})
        client.finalize_logged_model(m.model_id, LoggedModelStatus.FAILED)
        failed.append(m.model_id)
    return failed


def orphaned_versions(client: Any, name: str | None = None,
                      required_tags: tuple[str, ...] = REQUIRED_VERSION_TAGS) -> list[tuple[Any, str]]:
    """(version, why) for each model version that registration left half-made: no alias, not already set aside,
    its source run no longer RUNNING, and a registration status other than READY or a required tag missing."""
    flt = f"name = '{name}'" if name else None
    out = []
    for mv in _paged(lambda token: client.search_model_versions(flt, page_token=token)):
        if getattr(mv, "aliases", None) or ORPHAN_TAG in mv.tags:
            continue
        missing = [t for t in required_tags if t not in mv.tags]
        status = str(getattr(mv, "status", "READY"))
        if not missing and status.endswith("READY"):
            continue
        if _run_status(client, mv.run_id) == "RUNNING":  # being registered right now by a live process
            continue
        why = f"registration did not finish (status {status})" if not status.endswith("READY") else \
            f"registration did not finish: no {', '.join(missing)} tag"
        out.append((mv, why))
    return out


def set_aside_orphaned_versions(client: Any, name: str | None = None, *, delete: bool = False,
                                required_tags: tuple[str, ...] = REQUIRED_VERSION_TAGS) -> list[str]:
    """Tag each orphaned version `grouplora.orphaned=<why>` (delete=True: delete it, noting so on its source
    run, whose artifacts stay); returns "name/version" for each."""
    done = []
    for mv, why in orphaned_versions(client, name, required_tags):
        if delete:
            if mv.run_id and _run_status(client, mv.run_id) is not None:
                client.set_tag(mv.run_id, f"{ORPHAN_TAG}.deleted_version", f"{mv.name}/{mv.version}: {why}")
            client.delete_model_version(mv.name, mv.version)
        else:
            client.set_model_version_tag(mv.name, mv.version, ORPHAN_TAG, why)
        done.append(f"{mv.name}/{mv.version}")
    return done


# ---------------------------------------------------------------------------------------------- together


def recover(instance: Any = None, client: Any = None, *, registered_name: str | None = None,
            delete_orphans: bool = False, local_workers: bool = False,
            unowned_older_than_s: float | None = None) -> RecoveryReport:
    """All of the above, in the order that makes each step see the previous one's result: Dagster runs first
    (an MLflow run tied to a failed Dagster run is then dead), then MLflow runs, logged models, versions."""
    report = RecoveryReport()
    if instance is not None:
        report.dagster_runs_failed = fail_stale_runs(instance, local_workers=local_workers,
                                                     unowned_older_than_s=unowned_older_than_s)
    if client is not None:
        report.mlflow_runs_killed = kill_stale_mlflow_runs(client, instance, unowned_older_than_s=unowned_older_than_s)
        report.logged_models_failed = fail_pending_logged_models(client)
        report.versions_orphaned = set_aside_orphaned_versions(client, registered_name, delete=delete_orphans)
    return report
