"""The pipeline itself, timed: `grouplora run` on a data pack (the `scale` preset: 104 real datasets) with a fresh
GROUPLORA_HOME, while a sampler records peak GPU memory (nvidia-smi) and the peak resident memory of the run's
process tree; then the run's own Dagster event log gives the wall time per stage and per asset, and the assets'
metadata give the SDP's time and certified gap, the estimator's time and subset count, and the features pass's
examples/s. Writes benchmarks/results/pipeline_<device>.json (keys of other writers, e.g.
`gradient_features.py --pipeline`, kept).

    python benchmarks/pipeline_gpu.py --data /root/scale --device cuda --dtype bfloat16 \\
        --settings benchmarks/gpu/scale.yaml --home /root/plhome            # on the H200 (remote.sh pipe)
    python benchmarks/pipeline_gpu.py --data /tmp/some-pack --device cpu --model tiny --home /tmp/plhome  # smoke

--home keeps the GROUPLORA_HOME (Dagster and MLflow state) for the UI screenshot (`grouplora ui`, see
benchmarks/README "The pipeline on a GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_profile import collect, summarize  # noqa: E402  (the same reading of a run's event log)

STAGE_NAMES = {"datasets": "dataset partitions (dataset, features, zero-shot)", "suite": "estimates, affinity, "
               "partition", "adapters": "adapters (groups + all)", "ensemble": "boosting, weights, scoring"}


# ------------------------------------------------------------------------------------------- memory


def _tree(root: int) -> list[int]:
    """root and every descendant process (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _gpu_used_mb() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return max(float(x) for x in out.split()) if out.strip() else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


class Sampler(threading.Thread):
    """Peak RSS of a process tree and peak GPU memory in use, every `every` seconds."""

    def __init__(self, pid: int, gpu: bool, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.gpu, self.every = pid, gpu, every
        self.peak_rss, self.peak_gpu_mb, self.gpu_idle_mb = 0, 0.0, _gpu_used_mb() if gpu else None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_rss = max(self.peak_rss, _rss(_tree(self.pid)))
            if self.gpu:
                self.peak_gpu_mb = max(self.peak_gpu_mb, _gpu_used_mb() or 0.0)
            self.stop.wait(self.every)


# ------------------------------------------------------------------------------------------ metadata


def materializations(instance, key: str) -> list[dict]:
    """Every materialization of asset `key`: {partition, metadata values as plain Python}."""
    import dagster as dg
    out = []
    for rec in instance.fetch_materializations(dg.AssetKey(key), limit=10_000).records:
        m = rec.asset_materialization
        out.append({"partition": m.partition, "metadata": {k: getattr(v, "value", v) for k, v in m.metadata.items()}})
    return out


def asset_figures(home: Path) -> dict:
    """SDP time / certified gap, estimator time / subsets, features examples/s, from the assets' metadata."""
    import dagster as dg
    os.environ["DAGSTER_HOME"] = str(home)
    instance = dg.DagsterInstance.get()
    out: dict = {}
    part = materializations(instance, "task_partition")
    if part:
        md = part[0]["metadata"]
        out["partition"] = {k: md.get(k) for k in ("m", "method", "objective", "seconds", "clustering_seconds",
                                                   "sdp_upper_bound", "sdp_certified_gap", "sdp_relative_gap",
                                                   "sdp_iterations", "sdp_converged", "n_datasets")}
    est = materializations(instance, "subset_estimates")
    if est:
        md = est[0]["metadata"]
        out["estimator"] = {k: md.get(k) for k in ("n_subsets", "n_datasets", "d", "seconds", "ms_per_subset",
                                                   "converged", "lam")}
    feats = materializations(instance, "gradient_features")
    if feats:
        rows = [f["metadata"] for f in feats if f["metadata"].get("seconds")]
        n = sum(int(r.get("dagster/row_count", 0)) for r in rows)
        s = sum(float(r["seconds"]) for r in rows)
        out["features_asset"] = {"partitions": len(rows), "examples": n, "seconds_in_pass": round(s, 2),
                                 "examples_per_s": round(n / s, 1) if s else None}
    return out


# ------------------------------------------------------------------------------------------------ run


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GROUPLORA_COMMIT", "unknown")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a data pack folder (grouplora data build --preset scale)")
    ap.add_argument("--home", type=Path, required=True, help="a fresh GROUPLORA_HOME (emptied first)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--settings", type=Path, default=None, help="project settings file (YAML)")
    ap.add_argument("--model", default=None, help="GROUPLORA_BASE_MODEL (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--executor", default="in_process")
    ap.add_argument("--timeout", type=float, default=0, help="stop the run after this many seconds (0: never)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--resume", action="store_true", help="keep --home: `grouplora run` resumes what a call cut "
                    "short (wall time adds up over the calls)")
    a = ap.parse_args()

    path = a.out / f"pipeline_{a.device.split(':')[0]}.json"
    prev = json.loads(path.read_text()) if a.resume and path.exists() else {}  # what earlier calls measured
    if a.home.exists() and not a.resume:
        shutil.rmtree(a.home)
    a.home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GROUPLORA_HOME": str(a.home), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("DAGSTER_HOME", None)
    if a.model:
        env["GROUPLORA_BASE_MODEL"] = a.model
    cmd = [sys.executable, "-m", "grouplora.cli", "run", "--datasets", str(a.data), "--device", a.device,
           "--executor", a.executor]
    cmd += ["--dtype", a.dtype] if a.dtype else []
    cmd += ["--settings", str(a.settings)] if a.settings else []
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    sampler = Sampler(proc.pid, gpu=a.device.startswith("cuda"))
    sampler.start()
    try:
        rc = proc.wait(timeout=a.timeout or None)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    wall = time.perf_counter() - t0 + prev.get("wall_s", 0.0)
    sampler.stop.set()
    sampler.join()

    home = a.home / "dagster_home"
    runs = collect(home)
    summary = summarize(runs, wall)
    n = len([p for p in a.data.iterdir() if p.suffix in (".parquet", ".csv", ".jsonl")])
    res = {
        "commit": commit(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "exit": rc,
        "command": "python " + " ".join([str(Path(__file__).relative_to(ROOT))] + sys.argv[1:]),
        "n_datasets": n, "device": a.device, "dtype": a.dtype,
        "settings": a.settings.read_text() if a.settings else None,
        "wall_s": round(wall, 1), "stage_seconds": summary["stages_s"], "stage_names": STAGE_NAMES,
        "asset_seconds": summary["assets_s"], "runs": summary["runs"], "failed_runs": summary["failed_runs"],
        "run_overhead_s": summary["run_overhead_s"],
        "peak_host_rss_mb": max(round(sampler.peak_rss / 2**20, 1), prev.get("peak_host_rss_mb") or 0.0),
        "peak_gpu_memory_mb": max(sampler.peak_gpu_mb, prev.get("peak_gpu_memory_mb") or 0.0) if sampler.gpu else None,
        "gpu_memory_idle_mb": sampler.gpu_idle_mb, "calls": prev.get("calls", 0) + 1,
        **asset_figures(home),
    }
    if sampler.gpu:
        import torch
        res["device_name"] = torch.cuda.get_device_name()
    a.out.mkdir(parents=True, exist_ok=True)
    other = json.loads(path.read_text()) if path.exists() else {}  # keys of other writers (the features bench)
    path.write_text(json.dumps(other | res, indent=2, default=str) + "\n")
    print(json.dumps({k: res[k] for k in ("exit", "n_datasets", "wall_s", "stage_seconds", "peak_host_rss_mb",
                                          "peak_gpu_memory_mb")}, indent=1, default=str))
    print(json.dumps({k: res.get(k) for k in ("partition", "estimator", "features_asset")}, indent=1, default=str))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
