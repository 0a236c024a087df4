"""The demo's ensemble stage alone, two versions of the code on copies of ONE finished demo home, in one session.

Each version (a git ref in its own worktree + .venv, as benchmarks/demo_profile.py does; `.` = this checkout)
re-materializes only the `ensemble` asset (in-process executor, Dagster's real run) on its own copy of HOME,
sampled by py-spy (20 Hz, low overhead) so the seconds can be split by function; then the two versions' results
are compared: the results table (storage/ensemble/results.parquet, every column) and the served weights
(ensemble.json) must be equal.

    flock /work/cpu.lock python benchmarks/ensemble_stage.py --home /tmp/speed/dp/new-home --ref old=main --ref new=.

Writes benchmarks/results/ensemble_stage.json (--out): per version the process wall time, the asset's own
seconds and boosting seconds (its materialization metadata), the seconds per function of interest (py-spy), and
the ratios new / old; the comparison; the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_profile import ROOT, checkout, commit_of, load, sh  # noqa: E402

CHILD = """
import json, time
t0 = time.perf_counter()
import dagster as dg
from grouplora.orchestration.run import ensemble_job, get_instance, run_job
inst = get_instance()
t1 = time.perf_counter()
run_job(inst, ensemble_job, asset_selection=[dg.AssetKey("ensemble")], executor="in_process")
t2 = time.perf_counter()
md = inst.get_latest_materialization_event(dg.AssetKey("ensemble")).asset_materialization.metadata
print("RESULT " + json.dumps({"import_s": round(t1 - t0, 1), "run_s": round(t2 - t1, 1),
                              "asset_s": md["seconds"].value, "boost_s": md["boost_seconds"].value}))
"""
# py-spy frames whose inclusive time is reported (function name as py-spy prints it)
FUNCTIONS = ["boost_groups", "boost_group", "ridge_base", "score_datasets", "adapter_logprobs", "merged_logprobs",
             "logprobs_by_dataset", "mixed_logprobs", "predict_logprobs", "boost_adapter_from_w", "line_search",
             "fit_dataset_weights", "loaded_model", "merge_adapters", "load_base_model", "start_run"]


def copy_home(src: Path, dest: Path) -> None:
    """A copy of the finished home whose MLflow artifacts go to the copy, not to the original."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    with sqlite3.connect(dest / "mlflow" / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (str(src), str(dest)))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (str(src), str(dest)))


def function_seconds(raw: Path, rate: int) -> dict[str, float]:
    """Inclusive seconds per function of interest from py-spy's raw (collapsed) output."""
    hits: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = {f.split(" (")[0] for f in stack.split(";")}
        total += int(n)
        for f in FUNCTIONS:
            if f in frames:
                hits[f] += int(n)
    return {"sampled_s": round(total / rate, 1), **{f: round(hits[f] / rate, 1) for f in FUNCTIONS if hits[f]}}


def run_version(label: str, ref: str, home_src: Path, workdir: Path, rate: int) -> dict:
    log = workdir / f"{label}.log"
    folder = checkout(label, ref, workdir, False, log)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROUPLORA_", "DAGSTER_"))}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    res = {"ref": ref, "commit": commit_of(ref), "folder": str(folder), "log": str(log)}
    if ref == ".":
        res["uncommitted_changes"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                         cwd=ROOT, capture_output=True, text=True).stdout.strip())
    res["install_s"] = round(sh(["make", "install"], folder, env, log), 1)
    home = workdir / f"{label}-home"
    copy_home(home_src, home)
    env |= {"GROUPLORA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home")}
    raw = workdir / f"{label}.pyspy.txt"
    res["load_before"] = load()
    t0 = time.perf_counter()
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "py-spy"), "record", "-r", str(rate), "-f", "raw", "-o",
                          str(raw), "--", str(folder / ".venv" / "bin" / "python"), "-c", CHILD],
                         cwd=folder, env=env, capture_output=True, text=True)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["load_after"] = load()
    with open(log, "a") as f:
        f.write(out.stdout + out.stderr)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{label}: the ensemble run failed (exit {out.returncode}); see {log}")
    res |= json.loads(lines[-1].removeprefix("RESULT "))
    res["py_spy_s"] = function_seconds(raw, rate)
    res["home"] = str(home)
    return res


def compare(old_home: Path, new_home: Path) -> dict:
    """Results tables equal (every column) and served weights equal (max |difference|)."""
    import pandas as pd

    a = pd.read_parquet(old_home / "storage" / "ensemble" / "results.parquet").set_index("dataset").sort_index()
    b = pd.read_parquet(new_home / "storage" / "ensemble" / "results.parquet").set_index("dataset").sort_index()
    out = {"columns_equal": list(a.columns) == list(b.columns)}
    cols = [c for c in a.columns if c in b.columns]
    acc = [c for c in cols if a[c].dtype.kind == "f"]
    out["max_abs_diff"] = {c: float((a[c] - b[c]).abs().max()) for c in acc if (a[c] != b[c]).any()}
    out["unequal_columns"] = [c for c in cols if not a[c].equals(b[c])]
    wa = json.loads((old_home / "storage" / "ensemble" / "current" / "ensemble.json").read_text())["weights"]
    wb = json.loads((new_home / "storage" / "ensemble" / "current" / "ensemble.json").read_text())["weights"]
    out["same_weight_keys"] = {d: sorted(w) for d, w in wa.items()} == {d: sorted(w) for d, w in wb.items()}
    out["weights_max_abs_diff"] = max((abs(w[k] - wb[d].get(k, 0.0)) for d, w in wa.items() for k in w), default=0.0)
    out["tables_equal"] = out["columns_equal"] and not out["unequal_columns"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", required=True, help="a finished demo home (GROUPLORA_HOME of a full `grouplora run`)")
    ap.add_argument("--ref", action="append", required=True,
                    help="old=REF and new=REF ('.' = this checkout), run in the order given")
    ap.add_argument("--workdir", default="/tmp/ensemble-stage")
    ap.add_argument("--rate", type=int, default=20, help="py-spy samples per second")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ensemble_stage.json"))
    args = ap.parse_args()
    refs = dict(r.split("=", 1) for r in args.ref)
    if set(refs) != {"old", "new"}:
        ap.error("give --ref old=REF and --ref new=REF")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = {label: run_version(label, ref, Path(args.home).resolve(), workdir, args.rate)
            for label, ref in refs.items()}
    o, n = runs["old"], runs["new"]
    report = {"command": "python " + " ".join(sys.argv), "home": str(Path(args.home).resolve()), "runs": runs,
              "ratio_new_over_old": {k: round(n[k] / o[k], 3) for k in ("wall_s", "run_s", "asset_s", "boost_s")},
              "comparison": compare(Path(o["home"]), Path(n["home"]))}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("ratio_new_over_old", "comparison")}, indent=2))


if __name__ == "__main__":
    main()
