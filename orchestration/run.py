"""Run the pipeline from the command line through a real, project-local Dagster instance.

Every run goes through Dagster (same runs, logs and materializations the UI shows), with the multiprocess
executor, so what works here works when a daemon or a cluster executor launches the same jobs. What is current
(and skipped, so a rerun resumes) is decided from Dagster's records by orchestration/freshness.py.
"""

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg

from grouplora.ml.atomic import atomic_path
from grouplora.orchestration import freshness, settings
from grouplora.orchestration.jobs import PER_DATASET_ASSETS
from grouplora.orchestration.partitions import dataset_partitions
from grouplora.orchestration.recovery import owner_tags

Executor = Literal["multiprocess", "in_process", "ray"]

DAGSTER_YAML = """\
# Project-local Dagster instance (written by grouplora). Runs, events and schedules live in this folder.
telemetry:
  enabled: false
nux:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 2
# A run whose worker never starts is failed after the timeout (the daemon's start-up check). A worker killed later
# is found by the stale_runs_sensor (orchestration/sensors.py): the default run launcher has no health check.
run_monitoring:
  enabled: true
  start_timeout_seconds: 300
  cancel_timeout_seconds: 300
  max_resume_run_attempts: 0
  poll_interval_seconds: 120
"""


def dagster_home() -> Path:
    """DAGSTER_HOME under GROUPLORA_HOME (created with its dagster.yaml on first use)."""
    path = Path(os.environ.get("DAGSTER_HOME") or settings.home() / "dagster_home")
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        with atomic_path(config) as tmp:  # a process starting beside this one reads all of it or none
            tmp.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def get_instance() -> dg.DagsterInstance:
    dagster_home()
    return dg.DagsterInstance.get()


def _job(name: str) -> dg.JobDefinition:
    from grouplora.orchestration.definitions import defs

    return defs.resolve_job_def(name)


def ray_job(name: str, address: str | None = None) -> dg.JobDefinition:
    """Job `name` of the Definitions with the Ray executor at `address` (reconstructed in every step's process)."""
    from grouplora.orchestration.definitions import build_definitions
    from grouplora.orchestration.executors import ray_executor

    return build_definitions(ray_executor(address)).resolve_job_def(name)


def use_gpu_pool(executor: Executor) -> None:
    """Multiprocess on one host: at most one GPU step per GPU at once (one slot on a CPU-only host)."""
    if executor == "multiprocess":
        import torch

        from grouplora.orchestration.executors import set_gpu_pool_limit

        set_gpu_pool_limit(get_instance(), max(1, torch.cuda.device_count()))


def dataset_job() -> dg.JobDefinition:
    return _job("dataset_job")


def suite_job() -> dg.JobDefinition:
    return _job("suite_job")


@dataclass(frozen=True)
class StepFailure:
    """One failed step of a run: its key, the class and message of the step's own exception (e.g. a DatasetError
    naming file and row, not Dagster's wrapper around it), and the whole error chain with stack traces."""

    step: str
    error_class: str
    message: str
    detail: str


class StepFailures(RuntimeError):
    """A run failed; one StepFailure per failed step (or one for the run when no step failed)."""

    def __init__(self, run_id: str, job_name: str, failures: list[StepFailure], partition: str | None = None):
        self.run_id, self.job_name, self.failures, self.partition = run_id, job_name, failures, partition
        super().__init__(f"run {run_id} of {job_name}" + (f" ({partition})" if partition else "") + " failed: "
                         + "; ".join(self.lines()))

    def lines(self) -> list[str]:
        """`<step>: <message>`, one line per failed step."""
        return [f"{f.step}: {f.message.splitlines()[0] if f.message else f.error_class}" for f in self.failures]

    def input_errors(self) -> bool:
        """Every failure is a problem with an input file (a DatasetError or one of its kinds)."""
        return bool(self.failures) and all(f.error_class in INPUT_ERRORS for f in self.failures)


INPUT_ERRORS = {"DatasetError", "ConfigError", "LimitError"}


def _root_cause(error) -> StepFailure:
    """The user's own exception (e.g. a DatasetError naming file and row), not Dagster's wrapper around it."""
    detail = error.to_string()
    while getattr(error, "cause", None) is not None:
        error = error.cause
    message = error.message.strip()
    qualified = message.split(": ", 1)
    if error.cls_name and len(qualified) == 2 and qualified[0].split(".")[-1] == error.cls_name:
        message = qualified[1]  # "grouplora.ml.data_format.DatasetError: f.csv: ..." -> "f.csv: ..."
    return StepFailure("", error.cls_name or "Error", message, detail)


def _failures(result) -> list[StepFailure]:
    out = []
    for event in result.all_events:
        data = event.event_specific_data
        if event.is_step_failure and data is not None and getattr(data, "error", None) is not None:
            cause = _root_cause(data.error)
            out.append(StepFailure(event.step_key, cause.error_class, cause.message, cause.detail))
    if not out:  # the run failed outside any step (e.g. a resource that cannot start)
        event = result.get_run_failure_event()
        error = getattr(event.event_specific_data, "error", None)
        cause = _root_cause(error) if error is not None else StepFailure("", "Error", event.message or "", "")
        out.append(StepFailure("run", cause.error_class, cause.message or (event.message or ""), cause.detail))
    return out


def run_job(instance: dg.DagsterInstance, job_fn: Callable[[], dg.JobDefinition], tags: dict[str, str] | None = None,
            asset_selection: list[dg.AssetKey] | None = None, executor: Executor = "multiprocess") -> str:
    """One run of a job, tagged with this process as its owner (orchestration/recovery.py); raise StepFailures
    with each failing step's own error if it fails.

    "multiprocess" runs every step in its own process (what the daemon and a cluster do); "in_process" runs
    the steps of this run in one process, which on a small CPU saves loading torch and the model per step;
    "ray" submits every step as a Ray job ($RAY_ADDRESS; orchestration/executors.py). The run carries the
    project's settings in its run config (resources.settings_run_config)."""
    from grouplora.orchestration.resources import settings_run_config

    console = {"log_level": os.environ.get("GROUPLORA_LOG_LEVEL", "INFO"), "tracebacks": settings.debug()}
    run_config = {"loggers": {"console": {"config": console}}, "resources": settings_run_config()}
    tags = {**owner_tags(), **(tags or {})}
    if executor == "ray":  # a job of its own, with the Ray executor: it takes no "execution" config
        job = dg.build_reconstructable_job(__name__, ray_job.__name__, reconstructable_kwargs={
            "name": job_fn().name, "address": os.environ.get("RAY_ADDRESS")})
    else:
        job = dg.reconstructable(job_fn)
        run_config["execution"] = {"config": {executor: {}}}
    with dg.execute_job(job, instance=instance, tags=tags, run_config=run_config,
                        asset_selection=asset_selection, raise_on_error=False) as result:
        if not result.success:
            raise StepFailures(result.run_id, result.job_def.name, _failures(result), tags.get("dagster/partition"))
        return result.run_id


def run_datasets(names: Iterable[str], versions: dict[str, str], *, executor: Executor = "multiprocess",
                 progress: Callable[[str, str], None] | None = None) -> tuple[list[str], dict[str, StepFailures]]:
    """Materialize the per-dataset assets for each name; a partition that is already current is skipped (so a
    rerun resumes where it stopped), one that fails does not stop the others. Returns (names that ran, failures
    by name)."""
    instance = get_instance()
    names = sorted(names)
    register_datasets(instance, names)
    expected = settings_metadata()
    return run_partitions(instance, dataset_job, names,
                          lambda n: freshness.partition_is_current(instance, n, versions[n], PER_DATASET_ASSETS,
                                                                   expected),
                          executor=executor, progress=progress)


def settings_metadata() -> dict[str, dict]:
    """{asset: {metadata key: value}} that a materialization must have recorded to be current under the project's
    settings now: after a settings change the CLI re-runs what that setting changes."""
    from grouplora.orchestration.resources import project_settings

    s = project_settings()
    gradient, dtype = s["gradient_settings"], s["base_model"].dtype
    return {"zero_shot_scores": {"dtype": dtype},
            "gradient_features": {"settings": gradient.fingerprint(), "dtype": dtype},
            "meta_gradient_features": {"d": gradient.d, "seed": gradient.seed, "dtype": dtype},
            "meta_init_adapter": {"training": s["training_settings"].fingerprint(),
                                  "numerics": s["base_model"].numerics()}}


def register_datasets(instance: dg.DagsterInstance, names: list[str]) -> None:
    """Add the dataset partitions that the instance does not know yet."""
    known = set(instance.get_dynamic_partitions(dataset_partitions.name))
    new = [n for n in names if n not in known]
    if new:
        instance.add_dynamic_partitions(dataset_partitions.name, new)


def sync_datasets(instance: dg.DagsterInstance, names: Iterable[str]) -> list[str]:
    """Make the dataset partitions exactly `names` (the usable files of the folder), as the sensor does: add the new
    ones, delete those whose file was removed or is no longer usable, so the suite runs without them. Their stored
    artifacts stay (a file put back at the same version is current again). Returns the deleted names."""
    names = sorted(names)
    gone = sorted(set(instance.get_dynamic_partitions(dataset_partitions.name)) - set(names))
    for name in gone:
        instance.delete_dynamic_partition(dataset_partitions.name, name)
    register_datasets(instance, names)
    return gone


def run_partitions(instance: dg.DagsterInstance, job_fn: Callable[[], dg.JobDefinition], keys: Iterable[str],
                   is_done: Callable[[str], bool], *, executor: Executor,
                   progress: Callable[[str, str], None] | None = None) -> tuple[list[str], dict[str, StepFailures]]:
    """One run per partition key that is not done yet, in order; a failed run is recorded and the next one goes
    on. Returns (the keys that ran, failures by key)."""
    ran, failed = [], {}
    for key in keys:
        if is_done(key):
            if progress:
                progress(key, "current")
            continue
        if progress:
            progress(key, "running")
        try:
            run_job(instance, job_fn, tags={"dagster/partition": key}, executor=executor)
        except StepFailures as e:
            failed[key] = e
            if progress:
                progress(key, "failed")
            continue
        ran.append(key)
        if progress:
            progress(key, "done")
    return ran, failed


def adapter_job() -> dg.JobDefinition:
    return _job("adapter_job")


def ensemble_job() -> dg.JobDefinition:
    return _job("ensemble_job")


def run_adapters(keys: Iterable[str], *, executor: Executor = "multiprocess",
                 progress: Callable[[str, str], None] | None = None) -> tuple[list[str], dict[str, StepFailures]]:
    """Train each adapter partition that has no materialization yet (keys are content hashes: a key that
    exists was trained on exactly these data and settings). Returns (the keys that ran, failures by key)."""
    instance = get_instance()
    return run_partitions(instance, adapter_job, keys,
                          lambda k: freshness.latest_materialization(instance, "adapter", k) is not None,
                          executor=executor, progress=progress)


def run_ensemble(executor: Executor = "multiprocess") -> None:
    run_job(get_instance(), ensemble_job, executor=executor)



def run_suite(executor: Executor = "multiprocess") -> None:
    run_job(get_instance(), suite_job, executor=executor)


def selection_job() -> dg.JobDefinition:
    return _job("selection_job")


def run_selection(target: str, names: Iterable[str], versions: dict[str, str], *, executor: Executor = "multiprocess",
                  progress: Callable[[str, str], None] | None = None) -> list[str]:
    """Choose auxiliary datasets for `target`: materialize what target_selection needs that is missing or stale,
    then target_selection itself (always: it is cheap and reads the current settings). In order: each `dataset`
    partition not at its file's version; meta_init_adapter unless it was trained on these datasets after their
    last update; each dataset's meta_gradient_features unless taken after both the adapter and its dataset;
    meta_lam_calibration unless it ran after all of those under the same λ setting.
    Returns the steps that ran ("dataset:<name>", "meta_init_adapter", "meta_gradient_features:<name>",
    "meta_lam_calibration", "target_selection:<target>")."""
    names = sorted(names)
    if target not in names:
        raise ValueError(f"unknown target {target!r}; known datasets: {', '.join(names) or '(none)'}")
    if len(names) < 2:
        raise ValueError(f"no auxiliary datasets besides {target!r}: selection needs at least two datasets")
    instance = get_instance()
    register_datasets(instance, names)
    ran: list[str] = []

    def step(label: str, job_fn: Callable[[], dg.JobDefinition], partition: str, asset: str, done: bool) -> None:
        if done:
            if progress:
                progress(label, "current")
            return
        if progress:
            progress(label, "running")
        run_job(instance, job_fn, tags={"dagster/partition": partition}, asset_selection=[dg.AssetKey(asset)],
                executor=executor)
        ran.append(label)
        if progress:
            progress(label, "done")

    for n in names:
        step(f"dataset:{n}", dataset_job, n, "dataset", not freshness.dataset_is_stale(instance, n, versions[n]))
    # selection_job is partitioned by dataset; the unpartitioned adapter runs under the target's partition tag
    expected = settings_metadata()
    step("meta_init_adapter", selection_job, target, "meta_init_adapter",
         freshness.meta_init_is_current(instance, names, expected["meta_init_adapter"]))
    for n in names:
        step(f"meta_gradient_features:{n}", selection_job, n, "meta_gradient_features",
             freshness.meta_features_are_current(instance, n, expected["meta_gradient_features"]))
    from grouplora.orchestration.resources import project_settings

    lam = project_settings()["selection_settings"].lam
    step("meta_lam_calibration", selection_job, target, "meta_lam_calibration",
         not any(r.startswith("meta_") for r in ran) and freshness.calibration_is_current(
             instance, "meta_lam_calibration", ["meta_init_adapter", *(("meta_gradient_features", n) for n in names)],
             {"source": "pinned", "lam": lam} if lam is not None else {"source": "calibrated"}))
    step(f"target_selection:{target}", selection_job, target, "target_selection", False)
    return ran
