"""One GROUPLORA_HOME shared by several processes: its first initialization under a lock, the clean-up after a
crash, and one pipeline run at a time.

Every command that touches the stores (`grouplora run`, `demo`, `select`, `ui`, `promote`, `predict`) opens the home
with `open_home` first: under `<home>/.init.lock` it creates (or just opens) the Dagster instance and the MLflow
store, whose first-time schema migrations must not run twice at once (orchestration/locks.py says what breaks),
then closes what a crashed process left behind (orchestration/recovery.py). Commands that materialize assets then
hold `<home>/.run.lock` for their whole run (`exclusive_run`): a second `grouplora run` on the same home says that it
waits, and when its turn comes finds the first one's work current, so nothing is done twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from grouplora.orchestration import run, settings
from grouplora.orchestration.globs import check_home
from grouplora.orchestration.locks import home_lock
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.recovery import RecoveryReport, recover

INIT_LOCK = ".init.lock"
RUN_LOCK = ".run.lock"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class HomeError(ValueError):
    """GROUPLORA_HOME cannot hold the project's state (a character DuckDB cannot use, a file in the way)."""


def home_folder() -> Path:
    """GROUPLORA_HOME, checked and created; HomeError says what is wrong with it."""
    try:
        home = check_home(settings.home())
        home.mkdir(parents=True, exist_ok=True)
    except ValueError as e:
        raise HomeError(str(e)) from None
    except OSError as e:
        raise HomeError(f"GROUPLORA_HOME {settings.home()}: cannot create it: {e.strerror or e}") from None
    return home


def _touch(instance: dg.DagsterInstance) -> None:
    """Open every sqlite storage of an instance, creating and migrating it on first use."""
    instance.get_runs(limit=1)  # run storage, event-log index
    instance.get_dynamic_partitions(dataset_partitions.name)
    instance.all_instigator_state()  # schedule storage


def _staging(path: Path) -> Path:
    return path.with_name(f".{path.name}.init-{os.getpid()}")


def _clear_staging(path: Path) -> None:
    """Remove what a first initialization killed half-way left beside `path` (the caller holds the init lock, so
    no other process is initializing)."""
    for old in path.parent.glob(f".{path.name}.init-*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()


DAGSTER_STORES = ("schedules", "history")  # what a new sqlite instance creates; history/runs.db marks a made one


def _new_dagster_home(final: Path) -> None:
    """A new home's Dagster storages, made and migrated in a staging folder beside DAGSTER_HOME and moved in when
    complete. Made in place, a kill -9 during the first migrations left homes unusable for good (missing tables:
    "the dynamic partitions table ... does not exist")."""
    _clear_staging(final)
    if (final / "history" / "runs.db").exists() or (final / "dagster.yaml").read_text() != run.DAGSTER_YAML:
        return  # made already, or a configuration of the user's own (made in place, by Dagster)
    staging = _staging(final)
    staging.mkdir()
    (staging / "dagster.yaml").write_text(run.DAGSTER_YAML)
    with dg.DagsterInstance.from_config(str(staging)) as instance:
        _touch(instance)
    for sub in DAGSTER_STORES:  # history last: until it is in, the home counts as new
        if (final / sub).exists():
            shutil.rmtree(final / sub)
        os.rename(staging / sub, final / sub)
    shutil.rmtree(staging)


def _new_mlflow_store(tracking_uri: str) -> None:
    """A new sqlite MLflow store (tables, migrations, the experiment), made in a staging file and renamed into place
    when complete, for the same reason."""
    from mlflow.tracking import MlflowClient

    from grouplora.orchestration.registry import EXPERIMENT, experiment_id

    if not tracking_uri.startswith("sqlite:///"):
        return
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    _clear_staging(db)
    if db.exists():
        return
    staging = _staging(db)
    client = MlflowClient(tracking_uri=f"sqlite:///{staging}", registry_uri=f"sqlite:///{staging}")
    experiment_id(client, tracking_uri, EXPERIMENT)  # artifacts located beside the final file
    os.rename(staging, db)


def init_stores(tracking_uri: str | None, *, dagster: bool = True) -> tuple[dg.DagsterInstance | None, object]:
    """Create (atomically, when new) or open the Dagster instance and the MLflow store; run by `open_home` under
    the init lock."""
    from grouplora.orchestration.registry import EXPERIMENT, experiment_id, use_tracking

    instance = None
    if dagster:
        _new_dagster_home(run.dagster_home())
        instance = run.get_instance()
        _touch(instance)
    client = None
    if tracking_uri is not None:
        quiet = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables...": noise
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            _new_mlflow_store(tracking_uri)
            client = use_tracking(tracking_uri)
            experiment_id(client, tracking_uri, EXPERIMENT)
        finally:
            quiet.setLevel(level)
    return instance, client


def open_home(tracking_uri: str | None, *, dagster: bool = True, registered_name: str | None = None,
              local_workers: bool = False, notify: Callable[[str], None] = _say
              ) -> tuple[dg.DagsterInstance | None, RecoveryReport]:
    """Initialize the home's stores under the init lock and recover from a crash; returns the Dagster instance
    (None with dagster=False) and what recovery changed. tracking_uri None: leave MLflow alone."""
    home = home_folder()
    with home_lock(home / INIT_LOCK, timeout=settings.lock_timeout(), notify=notify,
                   message=f"waiting for another grouplora process ({{holder}}) to finish initializing {home} ..."):
        instance, client = init_stores(tracking_uri, dagster=dagster)
        report = recover(instance, client, registered_name=registered_name, local_workers=local_workers)
    return instance, report


@contextmanager
def exclusive_run(notify: Callable[[str], None] = _say) -> Iterator[None]:
    """Hold the home's run lock: one materializing command per home at a time; the next one waits, saying so."""
    home = home_folder()
    with home_lock(home / RUN_LOCK, timeout=settings.lock_timeout(), notify=notify,
                   message=f"another grouplora run is using {home} ({{holder}}); waiting for it to finish "
                           "(its work will not be done twice) ..."):
        yield
