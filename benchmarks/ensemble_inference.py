"""Ensemble inference: one adapter, the K-adapter ensemble as a loop over adapters, and the ensemble in one pass
(peft mixed-adapter batch), side by side in one process; the merged adapter (one adapter's cost) beside them.

Each timing is the project's own scoring call (`ml.ensemble.adapter_logprobs`, `merged_logprobs`) on the same
N prompts: throughput at --batch-size prompts per forward, and latency of one single-prompt request. Rounds
interleave the methods (the shared CPU's load drifts); the median round is reported, as wall-clock seconds
and as this process's CPU seconds. The headline keys use the wall clock on a GPU and the process CPU time on
a CPU: on an oversubscribed CPU the wall clock mostly measures the queue for a core, CPU time the work.
Minor page faults per call are recorded: the one pass's K-times larger activations can cross glibc's malloc
trim threshold and be faulted in again on every call (set MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ to
compare; the JSON records them). The K adapters are LoRA r 8, α 16 on q_proj/v_proj (the project's
TrainConfig) with seeded random A and B: inference cost does not depend on what the weights learned.
Prompts: the test split of --dataset in a data pack (--data, as built by `grouplora data build`), else
synthetic reviews. Only `grouplora.ml` is imported (the GPU machine has no MLflow/Dagster).

    python benchmarks/ensemble_inference.py --device cpu --data data/demo   # -> results/ensemble_inference_cpu.json
    python benchmarks/ensemble_inference.py --device cuda --data <pack>     # -> results/ensemble_inference_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from grouplora.ml.ensemble import AdapterSpec, DatasetSpec, Ensemble, adapter_logprobs, merged_logprobs, release
from grouplora.ml.lora import add_lora
from grouplora.ml.model import SMOLLM2, label_token_ids, load_base_model

RESULTS = Path(__file__).resolve().parent / "results"
RATIO = "one_pass_s / (k * one_adapter_s)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=SMOLLM2, help="smollm2-135m-instruct, tiny, or a HF model folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--k", type=int, default=3, help="adapters in the ensemble (the demo's: group, all, boost)")
    p.add_argument("--n", type=int, default=None, help="prompts (default 32 on CPU, 1024 on a GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward (default 16 CPU, 64 GPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency-reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--data", type=Path, default=None, help="a data pack folder (datasets.yaml + tables)")
    p.add_argument("--dataset", default="rotten_tomatoes", help="which dataset of --data gives the prompts")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.n = a.n or (1024 if gpu else 32)
    a.batch_size = a.batch_size or (64 if gpu else 16)
    return a


def prompts_and_words(a: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """(N prompts, label words, where they came from)."""
    if a.data is None:
        rng = np.random.default_rng(0)
        words = "the film acting plot was great dull and wonderful boring a story with its cast but".split()
        texts = [" ".join(rng.choice(words, size=int(rng.integers(8, 40)))) for _ in range(a.n)]
        return [f"Movie review: {t}\nIs the review positive or negative?\nAnswer:" for t in texts], \
            [" positive", " negative"], "synthetic reviews"
    from grouplora.ml.data_format import classes_for, discover, load_dataset, load_suite_config

    files = discover(a.data)
    if a.dataset not in files:
        raise SystemExit(f"{a.data}: no dataset {a.dataset!r}; it has {sorted(files)}")
    cfg = load_suite_config(a.data / "datasets.yaml").for_dataset(a.dataset)
    df = load_dataset(files[a.dataset], cfg)
    prompts = df[df["split"] == "test"]["prompt"].tolist() or df["prompt"].tolist()
    prompts = (prompts * (a.n // len(prompts) + 1))[: a.n]  # repeat a small split up to N
    return prompts, cfg.words_for(classes_for(df, cfg)), f"{a.data.name}/{a.dataset} test split"


def make_adapters(model, k: int, root: Path) -> list[Path]:
    """k saved LoRA adapters (project config) with random, non-zero B: each really changes the outputs."""
    paths = []
    for s in range(k):
        pm = add_lora(model, r=8, alpha=16, seed=s)
        g = torch.Generator().manual_seed(100 + s)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(root / f"adapter{s}")
        pm.unload()
        paths.append(root / f"adapter{s}")
    return paths


def timed(device: str, fn: Callable[[], object]) -> tuple[float, float, int]:
    """(wall s, process CPU s, minor page faults) of one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t, c, f = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t, time.process_time() - c,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)


def summary(runs: dict[str, list[tuple[float, float, int]]], k: int) -> dict:
    """Medians per method (wall, CPU, faults) and the ratios the issue asks for, on wall and CPU seconds."""
    out: dict = {}
    for i, unit in ((0, "wall"), (1, "cpu")):
        med = {m: statistics.median(r[i] for r in v) for m, v in runs.items()}
        out[unit] = {**med, RATIO: med["one_pass_s"] / (k * med["one_adapter_s"]),
                     "loop_s / (k * one_adapter_s)": med["loop_s"] / (k * med["one_adapter_s"]),
                     "one_pass_speedup_vs_loop": med["loop_s"] / med["one_pass_s"],
                     "merged_s / one_adapter_s": med["merged_s"] / med["one_adapter_s"]}
    out["minor_page_faults"] = {m: int(statistics.median(r[2] for r in v)) for m, v in runs.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_base_model(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    prompts, words, source = prompts_and_words(a)
    print(f"{a.model} on {a.device} ({a.dtype}), k={a.k}, {len(prompts)} prompts from {source}, "
          f"batch {a.batch_size}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="ensemble-inference-") as tmp:
        paths = make_adapters(model, a.k, Path(tmp))
        names = [p.name for p in paths]
        ens = Ensemble(a.model, "", [AdapterSpec(n, str(p)) for n, p in zip(names, paths)],
                       {"bench": {n: 1.0 / a.k for n in names}},
                       {"bench": DatasetSpec(words, "", label_token_ids(tok, words))})
        kw = dict(batch_size=a.batch_size, max_length=a.max_length)

        def methods(ps: list[str]) -> dict[str, Callable[[], object]]:
            return {"one_adapter_s": lambda: adapter_logprobs(ens, model, tok, "bench", ps, names[:1], **kw),
                    "loop_s": lambda: adapter_logprobs(ens, model, tok, "bench", ps, names, one_pass=False, **kw),
                    "one_pass_s": lambda: adapter_logprobs(ens, model, tok, "bench", ps, names, one_pass=True, **kw),
                    "merged_s": lambda: merged_logprobs(ens, model, tok, "bench", ps, **kw)}

        # warm-up (loads the adapters, builds the merged one) and the check that the one pass is the loop
        loop = adapter_logprobs(ens, model, tok, "bench", prompts, names, one_pass=False, **kw)
        one = adapter_logprobs(ens, model, tok, "bench", prompts, names, one_pass=True, **kw)
        diff = float(np.abs(loop - one).max())
        for fn in methods(prompts[:1]).values():
            fn()
        through = {m: [] for m in methods(prompts)}
        for r in range(a.rounds):
            for m, fn in methods(prompts).items():
                through[m].append(timed(a.device, fn))
            print(f"round {r} (wall/cpu s): " + ", ".join(f"{m} {v[-1][0]:.2f}/{v[-1][1]:.2f}"
                                                       for m, v in through.items()), flush=True)
        single = {m: [] for m in methods(prompts[:1])}
        for _ in range(a.latency_reps):
            for m, fn in methods(prompts[:1]).items():
                single[m].append(timed(a.device, fn))
        release(model)

    thr, lat = summary(through, a.k), summary(single, a.k)
    basis = "wall" if a.device.startswith("cuda") else "cpu"
    med = thr[basis]
    res = {
        "benchmark": "ensemble_inference", "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda")
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "model": a.model, "dtype": a.dtype, "threads": torch.get_num_threads(), "prompts": source,
        "n": len(prompts), "batch_size": a.batch_size, "k": a.k, "rounds": a.rounds,
        # one_adapter_s, loop_s, one_pass_s, merged_s and the ratios: GPU wall clock (synchronised), CPU this
        # process's CPU seconds (on a shared, oversubscribed CPU the wall clock measures the queue for a core)
        "time_basis": "wall" if basis == "wall" else "process_cpu", **med,
        "examples_per_s": {m.removesuffix("_s"): len(prompts) / med[m] for m in through},
        "wall": thr["wall"], "process_cpu": thr["cpu"], "minor_page_faults": thr["minor_page_faults"],
        "latency_one_prompt": {"wall": lat["wall"], "process_cpu": lat["cpu"]},
        "max_abs_logprob_diff_one_pass_vs_loop": diff,
        "runs_wall_cpu_faults": through, "latency_runs_wall_cpu_faults": single,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "command": "python benchmarks/ensemble_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = a.out or RESULTS / f"ensemble_inference_{'cuda' if a.device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    for name, t in (("throughput wall", thr["wall"]), ("throughput cpu", thr["cpu"]),
                    ("latency wall", lat["wall"]), ("latency cpu", lat["cpu"])):
        print(f"{name}: one adapter {t['one_adapter_s']:.3f} s, loop {t['loop_s']:.3f} s, one pass "
              f"{t['one_pass_s']:.3f} s, merged {t['merged_s']:.3f} s; {RATIO} = {t[RATIO]:.3f}, "
              f"loop / one pass = {t['one_pass_speedup_vs_loop']:.3f}")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
