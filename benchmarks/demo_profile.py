"""Where the demo's time goes, per stage and per asset, for two versions of the code in one session.

Each version is a git ref checked out into its own worktree with its own .venv (`make install`; the package is an
editable install with a package-dir remap, so two versions cannot share one environment). Each runs the real
chain, `grouplora run --datasets DATA` (or, with --cold, `make demo` in a fresh clone with an empty model/archive
cache: install, downloads, model conversion and the chain), with a fresh GROUPLORA_HOME; then its own Dagster event
log is read back for every run (job, partition, start/end) and every step (start/success). The versions take
turns (--rounds), so a drifting load on the shared machine hits both alike.

    python benchmarks/demo_profile.py --ref old=main --ref new=. --data data/demo
    python benchmarks/demo_profile.py --ref old=main --ref new=speed --data data/demo --cold
    python benchmarks/demo_profile.py --ref old=main --ref new=. --run-args new='--dtype bfloat16' --data data/demo
    python benchmarks/demo_profile.py --ref old=main --ref new=. --data /tmp/tiny-data --model tiny   # a smoke run

`.` is this checkout as it is (its own .venv). Writes benchmarks/results/demo_profile.json (--out): per version the
wall time, seconds per stage (dataset partitions, suite, adapters, ensemble, and the time outside Dagster runs) and
per asset (summed over partitions), every run, the machine's load, the results table, and the ratios new / old and
the two results tables compared (per method mean and per dataset); plus the command.

`--collect DAGSTER_HOME` (used internally, run with a version's own python) prints that instance's runs as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"dataset_job": "datasets", "suite_job": "suite", "adapter_job": "adapters", "ensemble_job": "ensemble",
          "selection_job": "selection", "report_job": "suite"}


# ------------------------------------------------------------------------------------------ collect


def collect(dagster_home: Path) -> list[dict]:
    """Every run of the instance at dagster_home: job, partition, status, start/end, and its steps' start/end."""
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    import dagster as dg

    instance = dg.DagsterInstance.get()
    runs = []
    for run in reversed(instance.get_runs()):  # oldest first
        stats = instance.get_run_stats(run.run_id)
        steps = [{"step": s.step_key, "status": str(s.status.value) if s.status else None,
                  "start": s.start_time, "end": s.end_time}
                 for s in instance.get_run_step_stats(run.run_id)]
        runs.append({"run_id": run.run_id, "job": run.job_name, "partition": run.tags.get("dagster/partition"),
                     "status": run.status.value, "start": stats.start_time, "end": stats.end_time, "steps": steps})
    return runs


def summarize(runs: list[dict], wall_s: float) -> dict:
    """Seconds per stage (by job) and per asset (by step key, summed over partitions) from collect()'s runs."""
    stages: dict[str, float] = {}
    assets: dict[str, dict] = {}
    run_overhead = 0.0
    for r in runs:
        if r["start"] is None or r["end"] is None:
            continue
        dur = r["end"] - r["start"]
        stage = STAGES.get(r["job"], r["job"])
        stages[stage] = stages.get(stage, 0.0) + dur
        step_sum = 0.0
        for s in r["steps"]:
            if s["start"] is None or s["end"] is None:
                continue
            a = assets.setdefault(s["step"], {"s": 0.0, "n": 0, "stage": stage})
            a["s"] += s["end"] - s["start"]
            a["n"] += 1
            step_sum += s["end"] - s["start"]
        run_overhead += dur - step_sum
    in_runs = sum(stages.values())
    return {"wall_s": round(wall_s, 1),
            "stages_s": {k: round(v, 1) for k, v in stages.items()} | {"outside_runs": round(wall_s - in_runs, 1)},
            "assets_s": {k: {"s": round(v["s"], 1), "n": v["n"], "stage": v["stage"]}
                         for k, v in sorted(assets.items(), key=lambda kv: -kv[1]["s"])},
            "run_overhead_s": round(run_overhead, 1),  # inside runs but outside steps: launching, events, teardown
            "runs": len(runs), "failed_runs": sum(r["status"] != "SUCCESS" for r in runs)}


# ------------------------------------------------------------------------------------------ checkouts


def sh(cmd: list[str] | str, cwd: Path, env: dict | None = None, log: Path | None = None) -> float:
    """Run a command (its output to `log`), raise if it fails; return its wall seconds."""
    t0 = time.perf_counter()
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        rc = subprocess.call(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, shell=isinstance(cmd, str))
    finally:
        if log:
            out.close()
    if rc != 0:
        raise RuntimeError(f"{cmd} failed in {cwd} (exit {rc}); see {log}")
    return time.perf_counter() - t0


def checkout(label: str, ref: str, workdir: Path, cold: bool, log: Path) -> Path:
    """The folder holding version `ref`: this checkout for '.', else a worktree (a fresh clone with --cold)."""
    if ref == "." and not cold:
        return ROOT
    dest = workdir / f"{label}-{'clone' if cold else 'wt'}"
    if cold:
        if dest.exists():
            shutil.rmtree(dest)
        sh(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(dest)], ROOT, log=log)
        if ref != ".":
            sh(["git", "checkout", "-q", commit_of(ref)], dest, log=log)
        else:  # this checkout's uncommitted state too
            diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
            if diff:
                subprocess.run(["git", "apply", "-"], cwd=dest, input=diff, check=True)
        return dest
    if not dest.exists():
        sh(["git", "worktree", "add", "-q", "--detach", str(dest), commit_of(ref)], ROOT, log=log)
    else:
        sh(["git", "checkout", "-q", "--detach", commit_of(ref)], dest, log=log)
    return dest


def commit_of(ref: str) -> str:
    cwd = ROOT
    return subprocess.run(["git", "rev-parse", ref if ref != "." else "HEAD"], cwd=cwd, capture_output=True,
                          text=True, check=True).stdout.strip()


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process so far: a version's chain's CPU time is the
    difference around it, less sensitive than wall time to other load on a shared machine."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_version(label: str, ref: str, args, workdir: Path) -> dict:
    log = workdir / f"{label}.log"
    folder = checkout(label, ref, workdir, args.cold, log)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROUPLORA_", "DAGSTER_"))}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "GROUPLORA_BASE_MODEL": args.model}
    res = {"ref": ref, "commit": commit_of(ref), "folder": str(folder), "log": str(log), "load_before": load()}
    if ref == ".":
        res["uncommitted_changes"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                         cwd=ROOT, capture_output=True, text=True).stdout.strip())
    extra = shlex.split(args.run_args.get(label, ""))
    res["run_args"] = extra
    cpu0 = children_cpu()
    if args.cold:  # everything a new user waits for: install, downloads, model conversion, the chain
        home = folder / "var"
        env |= {"GROUPLORA_CACHE": str(folder / ".cold-cache")}  # `make demo` builds and runs data/demo
        if not extra:
            wall = sh(["make", "demo"], folder, env, log)
        else:  # `make demo` is `make install` + `grouplora demo`: the same, with this version's arguments
            env |= {"DAGSTER_HOME": str(home / "dagster_home")}
            wall = sh(["make", "install"], folder, env, log)
            wall += sh([str(folder / ".venv" / "bin" / "grouplora"), "demo", *extra], folder, env, log)
    else:
        res["install_s"] = round(sh(["make", "install"], folder, env, log), 1)  # a no-op when current
        home = workdir / f"{label}-home"
        if home.exists():
            shutil.rmtree(home)
        env |= {"GROUPLORA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home")}
        cpu0 = children_cpu()  # the chain's alone, not the install check's
        wall = sh([str(folder / ".venv" / "bin" / "grouplora"), "run", "--datasets", str(Path(args.data).resolve()),
                   *extra], folder, env, log)
    res["load_after"] = load()
    res["cpu_s"] = round(children_cpu() - cpu0, 1)  # the chain's processes (and, with --cold, the install's)
    dagster_home = home / "dagster_home"
    out = subprocess.run([str(folder / ".venv" / "bin" / "python"), str(Path(__file__).resolve()), "--collect",
                          str(dagster_home)], capture_output=True, text=True, env=env, check=True)
    runs = json.loads(out.stdout)
    return res | summarize(runs, wall) | {"results": results_table(home)} | {"run_list": runs}


METHODS = ["zero_shot", "one_adapter_all", "grouped", "grouped_boosted", "ensemble", "ensemble_merged",
           "ensemble_with_all"]  # those a version reports; two versions are compared on the ones both report


def results_table(home: Path) -> dict:
    """The run's test accuracy table (storage/ensemble/results.parquet): {dataset: {method: accuracy}} with a
    MEAN row, over the methods both versions report."""
    import pandas as pd

    path = home / "storage" / "ensemble" / "results.parquet"
    if not path.exists():
        return {}
    table = pd.read_parquet(path).set_index("dataset")
    table = table[[m for m in METHODS if m in table.columns]]
    table.loc["MEAN"] = table.mean()
    return {d: {m: round(float(v), 4) for m, v in row.items()} for d, row in table.iterrows()}


def compare_results(old: dict, new: dict, tolerance: float = 0.0) -> dict:
    """Per method: the mean test accuracy of both versions and new − old; per dataset the differences; and
    whether the new table is no worse (every method's mean ≥ old's − tolerance)."""
    if not old or not new:
        return {"missing": [k for k, v in (("old", old), ("new", new)) if not v]}
    methods = [m for m in old["MEAN"] if m in new["MEAN"]]
    means = {m: {"old": old["MEAN"][m], "new": new["MEAN"][m], "diff": round(new["MEAN"][m] - old["MEAN"][m], 4)}
             for m in methods}
    per_dataset = {d: {m: round(new[d][m] - old[d][m], 4) for m in methods}
                   for d in old if d != "MEAN" and d in new}
    return {"mean": means, "diff_per_dataset": per_dataset, "tolerance": tolerance,
            "no_worse": all(v["diff"] >= -tolerance for v in means.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", action="append", default=[], metavar="LABEL=REF",
                    help="a version to time (git ref, or '.' = this checkout); give two or more, e.g. old=main new=.; "
                         "the others are compared with the first")
    ap.add_argument("--data", default=None, help="dataset folder (default: data/demo, built by `grouplora data build`)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="GROUPLORA_BASE_MODEL (tiny for a smoke run)")
    ap.add_argument("--cold", action="store_true", help="`make demo` in a fresh clone with an empty cache")
    ap.add_argument("--rounds", type=int, default=1, help="times each version runs, taking turns")
    ap.add_argument("--run-args", action="append", default=[], metavar="LABEL=ARGS",
                    help="extra arguments of one version's `grouplora run`/`demo`, e.g. new='--dtype bfloat16'")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/grouplora-demo-profile"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_profile.json")
    ap.add_argument("--collect", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.collect is not None:
        print(json.dumps(collect(args.collect)))
        return
    refs = dict(r.split("=", 1) for r in (args.ref or ["old=main", "new=."]))
    args.run_args = dict(r.split("=", 1) for r in args.run_args)
    if set(args.run_args) - set(refs):
        raise SystemExit(f"--run-args for unknown versions {sorted(set(args.run_args) - set(refs))}")
    if args.cold:
        args.data = None  # `make demo` builds the demo pack from the (empty) cache itself
    elif args.data is None:
        args.data = str(ROOT / "data" / "demo")
    if args.data and not Path(args.data).is_dir():
        raise SystemExit(f"no dataset folder {args.data}: build it with `grouplora data build --preset demo`")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {k: [] for k in refs}
    for rnd in range(args.rounds):
        for label, ref in refs.items():
            print(f"round {rnd + 1}/{args.rounds}: {label} = {ref} ...", flush=True)
            try:
                r = run_version(label, ref, args, args.workdir)
            except RuntimeError as e:  # a failed chain: keep what the others measured, say which one failed
                print(f"  {label}: FAILED: {e}", flush=True)
                results[label].append({"ref": ref, "failed": str(e)})
                continue
            print(f"  {label}: {r['wall_s']:.0f}s  " + "  ".join(f"{k} {v:.0f}s" for k, v in r["stages_s"].items()),
                  flush=True)
            results[label].append(r)
            out = report(args, results)  # written after every version: a long session keeps what it measured
    out = report(args, results)
    versions = out["versions"]
    print(json.dumps({k: {"wall_s": v["wall_s"], **v["stages_s"]} for k, v in versions.items()}, indent=2))
    if "ratios" in out:
        print(json.dumps(out["ratios"], indent=2))
        print(json.dumps({k: v.get("mean", v) | {"no_worse": v.get("no_worse")}
                          for k, v in out["results_comparison"].items()}, indent=2))
    print(f"-> {args.out}")


def report(args, results: dict[str, list[dict]]) -> dict:
    """The JSON of everything measured so far (the best finished round per version), written to args.out."""
    done = {k: [r for r in v if "failed" not in r] for k, v in results.items()}
    versions = {k: best(v) for k, v in done.items() if v}
    out = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "mode": "make demo, fresh clone, empty cache" if args.cold else "grouplora run, fresh GROUPLORA_HOME",
           "data": args.data, "model": args.model, "rounds": args.rounds,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
           "versions": versions, "all_rounds": {k: [strip(r) for r in v] for k, v in results.items()}}
    if len(versions) >= 2:  # every other version against the first
        (a, va), *others = versions.items()
        out["ratios"] = {f"{b}/{a}": ratios(va, vb) for b, vb in others}
        out["results_comparison"] = {f"{b} vs {a}": compare_results(va.get("results", {}), vb.get("results", {}))
                                     for b, vb in others}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


def best(rounds: list[dict]) -> dict:
    """The round with the least wall time (the least disturbed by other load), without its raw run list."""
    return strip(min(rounds, key=lambda r: r["wall_s"]))


def strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "run_list"}


def ratios(old: dict, new: dict) -> dict:
    keys = ["wall_s", "cpu_s"] + [f"stage:{k}" for k in old["stages_s"]] + [f"asset:{k}" for k in old["assets_s"]]

    def get(v: dict, k: str):
        if k in ("wall_s", "cpu_s"):
            return v.get(k)
        kind, name = k.split(":", 1)
        x = v["stages_s" if kind == "stage" else "assets_s"].get(name)
        return x["s"] if isinstance(x, dict) else x

    out = {k: round(get(new, k) / get(old, k), 3) for k in keys if get(old, k) and get(new, k) is not None}
    for step, parts in MERGED_STEPS.items():  # one new step that does what several old ones did
        if step in new["assets_s"] and step not in old["assets_s"] and all(p in old["assets_s"] for p in parts):
            out[f"asset:{step}/({'+'.join(parts)})"] = round(
                new["assets_s"][step]["s"] / sum(old["assets_s"][p]["s"] for p in parts), 3)
    return out


# theta0_pass materializes zero_shot_scores and gradient_features from one pass (assets/features.py)
MERGED_STEPS = {"theta0_pass": ["zero_shot_scores", "gradient_features"]}


if __name__ == "__main__":
    main()
