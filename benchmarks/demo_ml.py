"""The demo's ml/ work, old way against new way, in ONE process on the real model and the demo data pack.

The machine this runs on is shared: both ways run back to back and take turns every round, and every figure is
given as CPU seconds of this process (process_time: what our threads used, steadier than wall time when other
jobs compete for the cores) and wall seconds; ratios are new / old (< 1: the new way is cheaper).

- per_dataset: what one dataset partition computes. old: zero-shot log-probs of every split (predict_logprobs,
  batches of 16) + gradient features of train + validation (batches of 8) on a deep copy of the base with a fresh
  LoRA. new: ONE features pass with a token budget that also returns the zero-shot log-probs of train +
  validation (compute_features(return_logprobs=True)), the test split scored alone, the LoRA put on the base
  itself (lora_on, no copy). Checks that the zero-shot log-probs agree.
- training: train_adapter on a group of datasets, batches of 8 in random order (length_window = 1, the old
  way) vs grouped by length (length_window = 8): same epochs, lr, batch size; seconds, padded tokens, losses,
  and validation accuracy after training.
- budgets: the features pass and scoring in fixed batches of 8 / 16 (the old settings) vs token budgets.
- threads: the new per-dataset pass with 1 vs 2 torch threads (wall clock; meaningful on a quiet machine only).
- dtype: the new per-dataset pass and a training run in float32 vs bfloat16 weights (fp32 LoRA).

    python benchmarks/demo_ml.py --data data/demo --datasets strategyqa,rotten_tomatoes,vitaminc
    python benchmarks/demo_ml.py --data data/demo --parts training --train-datasets fever,intent

Writes benchmarks/results/demo_ml_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from grouplora.ml.data_format import classes_for, discover, load_dataset, load_suite_config
from grouplora.ml.features import compute_features
from grouplora.ml.lora import add_lora, lora_on
from grouplora.ml.model import label_token_ids, load_base_model
from grouplora.ml.projection import Projection
from grouplora.ml.scoring import predict_logprobs, prompt_lengths, shuffled_length_batches
from grouplora.ml.training import TrainConfig, TrainExample, evaluate, train_adapter

# The demo's settings (orchestration/resources.py): BaseModelResource, GradientSettings, TrainingSettings.
MAX_LENGTH, SCORE_BATCH, FEATURE_BATCH = 256, 16, 8
PARTS = ("per_dataset", "training", "budgets", "dtype", "threads")
TRAIN = dict(r=8, alpha=16, lr=1e-3, epochs=2, batch_size=8, max_length=160, warmup_ratio=0.1, seed=0)


def clock(fn):
    """(result, wall s, cpu s) of fn()."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def load_sets(folder: Path, names: list[str]) -> dict[str, dict]:
    cfg = load_suite_config(folder / "datasets.yaml")
    files = discover(folder)
    out = {}
    for n in names:
        c = cfg.for_dataset(n)
        df = load_dataset(files[n], c)
        out[n] = {"df": df, "words": c.words_for(classes_for(df, c))}
    return out


def per_dataset_old(model, tok, df, lab, args):
    zs = predict_logprobs(model, tok, df["prompt"].tolist(), lab, batch_size=SCORE_BATCH, max_length=MAX_LENGTH)
    pm = add_lora(copy.deepcopy(model), r=8, alpha=16, seed=0)  # assets/features.py: lora_model
    proj = Projection.for_model(pm, d=200, seed=0)
    fit = df["split"].isin(["train", "validation"]).to_numpy()
    f0, feats = compute_features(pm, tok, df["prompt"][fit].tolist(), df["label_id"][fit].tolist(), lab, proj,
                                 batch_size=FEATURE_BATCH, max_length=MAX_LENGTH)
    return zs, f0, feats


def per_dataset_new(model, tok, df, lab, args):
    fit = df["split"].isin(["train", "validation"]).to_numpy()
    zs = np.zeros((len(df), len(lab)), dtype=np.float32)
    with lora_on(model, r=8, alpha=16, seed=0) as pm:
        proj = Projection.for_model(pm, d=200, seed=0)
        f0, feats, zs[fit] = compute_features(pm, tok, df["prompt"][fit].tolist(), df["label_id"][fit].tolist(), lab,
                                              proj, batch_size=None, max_tokens=args.max_tokens,
                                              max_length=MAX_LENGTH, return_logprobs=True)
    zs[~fit] = predict_logprobs(model, tok, df["prompt"][~fit].tolist(), lab, batch_size=None,
                                max_tokens=args.max_tokens, max_length=MAX_LENGTH)
    return zs, f0, feats


def part_per_dataset(args, sets, models) -> dict:
    model, tok = models["float32"]
    rows, agree = {"old": [], "new": []}, []
    for r in range(args.rounds):
        for name, s in sets.items():
            lab = label_token_ids(tok, s["words"])
            ways = [("old", per_dataset_old), ("new", per_dataset_new)]
            for label, fn in (ways if r % 2 == 0 else ways[::-1]):
                out, wall, cpu = clock(lambda: fn(model, tok, s["df"], lab, args))
                rows[label].append({"dataset": name, "round": r, "wall_s": wall, "cpu_s": cpu, "out": out})
                print(f"  per_dataset {label} {name}: cpu {cpu:.1f}s wall {wall:.1f}s", flush=True)
    for o, n in zip(rows["old"], rows["new"]):
        agree.append({"dataset": o["dataset"], "zero_shot_max_abs_diff": float(np.abs(o["out"][0] - n["out"][0]).max()),
                      "f0_max_abs_diff": float(np.abs(o["out"][1] - n["out"][1]).max()),
                      "features_rel_diff": float(np.linalg.norm(o["out"][2] - n["out"][2]) / np.linalg.norm(o["out"][2]))})
    return summary(rows) | {"agreement": agree, "max_tokens": args.max_tokens}


def part_training(args, sets, models, ways=(("float32", 1), ("float32", 8)), old: str = "old") -> dict:
    train_ex, val_ex = [], []
    tok = models["float32"][1]
    for name in args.train_datasets.split(","):
        s = sets[name]
        lab = label_token_ids(tok, s["words"])
        for split, dest in (("train", train_ex), ("validation", val_ex)):
            d = s["df"][s["df"]["split"] == split]
            dest += [TrainExample(p, int(y), lab) for p, y in zip(d["prompt"], d["label_id"])]
    lengths = prompt_lengths(tok, [e.prompt for e in train_ex], TRAIN["max_length"])
    rows = {}
    for r in range(args.rounds):
        for dt, window in (ways if r % 2 == 0 else ways[::-1]):
            model, _ = models[dt]
            label = f"{'old' if window == 1 else 'new'}" + ("" if dt == "float32" else f"_{dt}")
            cfg = TrainConfig(**TRAIN, length_window=window)
            with tempfile.TemporaryDirectory() as tmp:
                res, wall, cpu = clock(lambda: train_adapter((model, tok), train_ex, cfg, Path(tmp) / "a"))
                with lora_on(model, adapter=Path(tmp) / "a") as pm:
                    loss, correct = evaluate(pm, tok, val_ex, batch_size=None, max_tokens=args.max_tokens,
                                             max_length=TRAIN["max_length"])
            padded = sum(len(b) * max(lengths[i] for i in b) for e in range(cfg.epochs)
                         for b in shuffled_length_batches(lengths, cfg.batch_size, [cfg.seed, e], window=window))
            rows.setdefault(label, []).append({
                "round": r, "wall_s": wall, "cpu_s": cpu, "steps": res.steps, "real_tokens": res.tokens,
                "padded_tokens": padded, "epoch_losses": res.epoch_losses, "val_loss": float(loss.mean()),
                "val_accuracy": float(correct.mean())})
            print(f"  training {label}: cpu {cpu:.1f}s wall {wall:.1f}s, padded/real {padded / res.tokens:.2f}, "
                  f"val acc {correct.mean():.3f}", flush=True)
    return summary(rows, old=old) | {"datasets": args.train_datasets, "n_train": len(train_ex), "n_val": len(val_ex),
                            "settings": TRAIN}


def part_dtype(args, per, models, sets) -> dict:
    rows = {}
    name = next(iter(per))
    s = per[name]
    for r in range(args.rounds):
        for dt in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
            model, tok = models[dt]
            lab = label_token_ids(tok, s["words"])
            out, wall, cpu = clock(lambda: per_dataset_new(model, tok, s["df"], lab, args))
            rows.setdefault(dt, []).append({"round": r, "wall_s": wall, "cpu_s": cpu, "out": out})
            print(f"  dtype {dt} {name}: cpu {cpu:.1f}s wall {wall:.1f}s", flush=True)
    a, b = rows["float32"][0]["out"], rows["bfloat16"][0]["out"]
    y = s["df"]["label_id"].to_numpy()
    res = summary(rows, old="float32", new="bfloat16") | {"dataset": name, "agreement": {
        "zero_shot_max_abs_diff": float(np.abs(a[0] - b[0]).max()),
        "zero_shot_argmax_agree": float((a[0].argmax(1) == b[0].argmax(1)).mean()),
        "zero_shot_acc_fp32": float((a[0].argmax(1) == y).mean()), "zero_shot_acc_bf16": float((b[0].argmax(1) == y).mean()),
        "f0_max_abs_diff": float(np.abs(a[1] - b[1]).max()),
        "features_cosine_min": float(((a[2] * b[2]).sum(1) / np.linalg.norm(a[2], axis=1) / np.linalg.norm(b[2], axis=1)).min())}}
    if args.dtype_training:  # the new (length-grouped) training in both dtypes
        res["training"] = part_training(args, sets, models, ways=(("float32", 8), ("bfloat16", 8)), old="new")
    return res


def part_budgets(args, sets, models) -> dict:
    """CPU cost of the features pass and of scoring against the batching: fixed batches (the old 8 and 16) vs
    token budgets, same prompts (every --datasets dataset's train + validation), taking turns per round."""
    model, tok = models["float32"]
    ways = [("features_b8", 8, None), ("scoring_b16", 16, None)]
    ways += [(f"features_t{t}", None, t) for t in args.budgets] + [(f"scoring_t{t}", None, t) for t in args.budgets]
    rows: dict[str, list[dict]] = {}
    with lora_on(model, r=8, alpha=16, seed=0) as pm:
        proj = Projection.for_model(pm, d=200, seed=0)
        for r in range(args.rounds):
            for name, s in sets.items():  # every way on one dataset back to back: drifting load hits them alike
                lab = label_token_ids(tok, s["words"])
                fit = s["df"][s["df"]["split"].isin(["train", "validation"])]
                prompts, labels = fit["prompt"].tolist(), fit["label_id"].tolist()
                for label, bs, budget in (ways if r % 2 == 0 else ways[::-1]):
                    if label.startswith("features"):
                        fn = lambda: compute_features(pm, tok, prompts, labels, lab, proj, batch_size=bs,
                                                      max_tokens=budget, max_length=MAX_LENGTH)
                    else:
                        fn = lambda: predict_logprobs(model, tok, prompts, lab, batch_size=bs, max_tokens=budget,
                                                      max_length=MAX_LENGTH)
                    _, wall, cpu = clock(fn)
                    rows.setdefault(label, []).append({"round": r, "dataset": name, "wall_s": wall, "cpu_s": cpu})
                print(f"  budgets round {r} {name}: " + ", ".join(
                    f"{k} {v[-1]['cpu_s']:.1f}" for k, v in rows.items()), flush=True)
    out = summary({k: v for k, v in rows.items() if k.startswith("features")}, old="features_b8")
    return out | summary({k: v for k, v in rows.items() if k.startswith("scoring")}, old="scoring_b16")


def part_threads(args, per, models) -> dict:
    """Wall time of the new per-dataset pass with 1 and 2 torch threads (on a quiet machine: is one process with
    2 threads faster than 2 processes with 1 thread each would be? wall(1) / wall(2) < 2 says processes win)."""
    model, tok = models["float32"]
    rows: dict[str, list[dict]] = {}
    old = torch.get_num_threads()
    try:
        for r in range(args.rounds):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                torch.set_num_threads(n)
                for name, s in per.items():
                    lab = label_token_ids(tok, s["words"])
                    _, wall, cpu = clock(lambda: per_dataset_new(model, tok, s["df"], lab, args))
                    rows.setdefault(f"threads_{n}", []).append({"round": r, "dataset": name, "wall_s": wall,
                                                                "cpu_s": cpu})
                print(f"  threads {n}: wall {sum(x['wall_s'] for x in rows[f'threads_{n}'] if x['round'] == r):.1f}s",
                      flush=True)
    finally:
        torch.set_num_threads(old)
    return summary(rows, old="threads_1")


def summary(rows: dict[str, list[dict]], old: str = "old", new: str = "new") -> dict:
    """Totals per way (summed over datasets, median over rounds) and the new/old ratios."""
    out = {}
    for label, rs in rows.items():
        by_round: dict[int, dict[str, float]] = {}
        for r in rs:
            t = by_round.setdefault(r["round"], {"wall_s": 0.0, "cpu_s": 0.0})
            t["wall_s"] += r["wall_s"]
            t["cpu_s"] += r["cpu_s"]
        out[label] = {k: round(statistics.median(t[k] for t in by_round.values()), 2) for k in ("wall_s", "cpu_s")}
        out[label]["rows"] = [{k: v for k, v in r.items() if k != "out"} for r in rs]
    for label in list(out):
        if label != old and old in out:
            out[f"ratio_{label}_to_{old}"] = {k: round(out[label][k] / out[old][k], 3) for k in ("wall_s", "cpu_s")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data/demo"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--parts", default="per_dataset,training,dtype")
    ap.add_argument("--datasets", default="strategyqa,rotten_tomatoes,vitaminc", help="for per_dataset and dtype")
    ap.add_argument("--train-datasets", default="fever,rotten_tomatoes,vitaminc", help="the group trained on")
    ap.add_argument("--max-tokens", type=int, default=1024, help="the token budget of the new way")
    ap.add_argument("--dtype-training", action="store_true", help="dtype part: also train in both dtypes")
    ap.add_argument("--budgets", default="256,512,1024,2048", type=lambda v: [int(x) for x in v.split(",")],
                    help="budgets part: token budgets to compare with fixed batches")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_ml_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    training = "training" in parts or ("dtype" in parts and args.dtype_training)
    names = list(dict.fromkeys(args.datasets.split(",") + (args.train_datasets.split(",") if training else [])))
    sets = load_sets(args.data, names)
    models = {"float32": load_base_model(args.model)}
    if "dtype" in parts:
        models["bfloat16"] = load_base_model(args.model, dtype=torch.bfloat16)
    res = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "model": args.model,
           "data": str(args.data), "threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rounds": args.rounds,
           "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "load_before": os.getloadavg()},
           "clock": "cpu_s = process_time (CPU seconds of this process's threads), wall_s = perf_counter; "
                    "ratios new/old"}
    per = {n: s for n, s in sets.items() if n in args.datasets.split(",")}
    runs = {"per_dataset": lambda: part_per_dataset(args, per, models),
            "training": lambda: part_training(args, sets, models),
            "budgets": lambda: part_budgets(args, per, models),
            "dtype": lambda: part_dtype(args, per, models, sets),
            "threads": lambda: part_threads(args, per, models)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for part in parts:
        print(part, flush=True)
        res[part] = runs[part]()
        res["machine"]["load_after"] = os.getloadavg()
        # written after every part; parts run separately accumulate in one file, each with the run it came from
        prev = json.loads(args.out.read_text()) if args.out.exists() else {}
        meta = {k: v for k, v in res.items() if k not in PARTS}
        args.out.write_text(json.dumps(prev | {part: res[part] | {"run": meta}}, indent=2) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk.startswith("ratio")} for k, v in res.items()
                      if isinstance(v, dict) and any(kk.startswith("ratio") for kk in v)}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
