"""First-time initialization race on a new GROUPLORA_HOME, with and without `orchestration.locks.home_lock`.

Each trial starts `--procs` processes on a new, empty home; each imports Dagster and MLflow, waits for a common
"go", then does what the start of `grouplora run` does to the stores: opens the project-local Dagster instance
(sqlite run, event-log and schedule storage, created and migrated on first use), registers a dynamic partition,
and opens the MLflow sqlite store (created and migrated on first use) and its experiment, then records one
MLflow run. Afterwards one more process, alone, checks that the home still works (the same steps). A trial's
home is broken when that check fails. With --lock each process does its initialization inside
home_lock(<home>/.init.lock).

    python benchmarks/init_race.py --trials 6 --procs 3            # both modes, writes benchmarks/results/init_race.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Like orchestration.run.DAGSTER_YAML (not imported: that module imports every asset, 20+ s per process).
DAGSTER_YAML = "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"


def init_stores(home: Path) -> None:
    """What the first steps of a run do to a home: Dagster instance + one dynamic partition, MLflow store +
    experiment + one run."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import dagster as dg
    from mlflow.tracking import MlflowClient

    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    with dg.DagsterInstance.get() as instance:
        instance.get_runs(limit=1)
        instance.add_dynamic_partitions("datasets", [f"p{os.getpid()}"])
    db = home / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("grouplora")
    exp_id = exp.experiment_id if exp is not None else _create_experiment(client, db)
    run = client.create_run(exp_id, run_name=f"init {os.getpid()}")
    client.set_terminated(run.info.run_id, "FINISHED")


def _create_experiment(client, db: Path) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment("grouplora", artifact_location=(db.parent / "artifacts").as_uri())
    except MlflowException:  # another process created it first (what orchestration.registry.experiment_id does)
        return client.get_experiment_by_name("grouplora").experiment_id


def worker(home: Path, go: Path, ready: Path, lock: bool) -> int:
    import dagster  # noqa: F401  (import before the "go": only the initialization itself should race)
    import mlflow  # noqa: F401

    from grouplora.orchestration.locks import home_lock

    ready.touch()
    while not go.exists():
        time.sleep(0.002)
    try:
        if lock:
            with home_lock(home / ".init.lock", timeout=300,
                           message=f"pid {os.getpid()}: waiting for another process to initialize {home}"):
                init_stores(home)
        else:
            init_stores(home)
    except Exception as e:  # the outcome is what we measure: report it, do not crash without a record
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}))
        return 1
    print(json.dumps({"ok": True}))
    return 0


def _python(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def trial(home: Path, procs: int, lock: bool, timeout: float = 300.0) -> dict:
    """One race on a new home; returns the workers' outcomes and whether the home still works afterwards."""
    home.mkdir(parents=True, exist_ok=False)
    sync = Path(tempfile.mkdtemp(prefix="init-race-sync-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ps = [subprocess.Popen(_python("--worker", str(home), str(sync / "go"), str(sync / f"ready{i}"),
                                   "--lock" if lock else "--no-lock"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for i in range(procs)]
    deadline = time.monotonic() + timeout
    while sum((sync / f"ready{i}").exists() for i in range(procs)) < procs and time.monotonic() < deadline:
        if any(p.poll() is not None for p in ps):
            break
        time.sleep(0.05)
    (sync / "go").touch()
    results = []
    for p in ps:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        lines = [line for line in out.splitlines() if line.startswith("{")]
        rec = json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {p.returncode}: {err.strip()[-300:]}"}
        rec["waited"] = "waiting for another process" in err
        results.append(rec)
    shutil.rmtree(sync, ignore_errors=True)
    check = subprocess.run(_python("--check", str(home)), capture_output=True, text=True, env=env, timeout=timeout)
    return {"workers": results, "home_ok": check.returncode == 0,
            "check_error": None if check.returncode == 0 else check.stderr.strip().splitlines()[-1:]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--modes", nargs="+", choices=["no_lock", "lock"], default=["no_lock", "lock"])
    ap.add_argument("--work", type=Path, default=None, help="Folder for the trial homes (default: a temp folder).")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "init_race.json")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="init-race-"))
    summary: dict = {"procs": args.procs, "trials": args.trials}
    for mode in args.modes:
        rows = []
        for t in range(args.trials):
            start = time.perf_counter()
            r = trial(work / f"{mode}-{t}", args.procs, lock=mode == "lock")
            r["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(r)
            print(f"{mode} trial {t}: home_ok={r['home_ok']} "
                  f"failed_workers={sum(not w['ok'] for w in r['workers'])} "
                  + "; ".join(w["error"] for w in r["workers"] if not w["ok"])[:400], flush=True)
        summary[mode] = {"broken_homes": sum(not r["home_ok"] for r in rows),
                         "failed_workers": sum(not w["ok"] for r in rows for w in r["workers"]),
                         "workers": args.procs * args.trials, "trials": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        home, go, ready, mode = sys.argv[2:6]
        sys.exit(worker(Path(home), Path(go), Path(ready), mode == "--lock"))
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        init_stores(Path(sys.argv[2]))
        sys.exit(0)
    main()
