"""How close are GradEx estimates to real fine-tuning? Estimate K random subsets of datasets, then really
fine-tune a LoRA on each, and compare every member dataset's validation loss and accuracy.

One process: (1) θ0 = base + fresh LoRA, projected gradient features of every train + validation example;
(2) estimate the subsets (regularised logistic fit per subset, scored under f = f0 + gᵀw); (3) fine-tune a fresh
LoRA per subset with train_adapter (same r, alpha, targets and seed as θ0) and score its real log-odds f;
(4) compare on the SAME definitions: loss = mean log(1 + exp(−f)), accuracy = mean(f > 0).

λ is not tuned on the subsets that are reported: the first --n-calibration subsets are fine-tuned too, λ is the
grid value with the lowest mean relative loss error on them, and only the other --n-subsets are scored.

    python benchmarks/estimation_fidelity.py --model tiny --device cpu --preset demo --n-subsets 8 \
        --max-train-per-dataset 16 --max-val-per-dataset 8 --epochs 1
    python benchmarks/estimation_fidelity.py --model smollm2-135m-instruct --device cuda --preset full \
        --max-train-per-dataset 300 --max-val-per-dataset 100 --n-subsets 10 --n-calibration 2 --epochs 2

Writes benchmarks/results/estimation_fidelity_<device>.json (device = cpu | cuda).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from grouplora.ml.data_format import classes_for, discover, load_dataset, load_suite_config
from grouplora.ml.estimation import FeatureSet, score, solve_subsets
from grouplora.ml.features import compute_features
from grouplora.ml.forward_mode import log_odds_from_logprobs
from grouplora.ml.lora import add_lora, load_adapter
from grouplora.ml.model import label_token_ids, load_base_model
from grouplora.ml.projection import Projection
from grouplora.ml.scoring import predict_logprobs
from grouplora.ml.subsets import Subset, make_subsets
from grouplora.ml.training import TrainConfig, TrainExample, train_adapter

ROOT = Path(__file__).resolve().parents[1]
LAM_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    """One dataset, capped: prompts and gold label indices per split, and its label words' first tokens."""

    name: str
    label_ids: list[int]
    train: pd.DataFrame  # columns prompt, label_id
    val: pd.DataFrame
    test: pd.DataFrame | None = None


def data_folder(args: argparse.Namespace) -> Path:
    if args.data is not None:
        return Path(args.data)
    folder = ROOT / "data" / args.preset
    if not (folder / "datasets.yaml").exists():  # build it once (needs the registry archives)
        from grouplora.ml.datapack import build_datapack
        build_datapack(args.preset, folder, progress=False)
    return folder


def _cap(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """A seeded random sample of at most n rows, in the file's order."""
    if n is None or len(df) <= n:
        return df
    return df.sample(n=n, random_state=seed).sort_index()


def load_data(folder: Path, tok, args: argparse.Namespace) -> tuple[list[Data], dict[str, str]]:
    """Every dataset in `folder` with both splits; datasets whose label words share a first token are skipped."""
    suite = load_suite_config(folder / "datasets.yaml")
    out, skipped = [], {}
    for name, path in discover(folder).items():
        cfg = suite.for_dataset(name)
        df = load_dataset(path, cfg)
        try:
            ids = label_token_ids(tok, cfg.words_for(classes_for(df, cfg)))
        except ValueError as e:  # e.g. the tiny test tokenizer
            skipped[name] = str(e)
            continue
        cols = ["prompt", "label_id"]
        train = _cap(df[df["split"] == "train"][cols], args.max_train_per_dataset, args.seed)
        val = _cap(df[df["split"] == "validation"][cols], args.max_val_per_dataset, args.seed)
        test = _cap(df[df["split"] == "test"][cols], getattr(args, "max_test_per_dataset", None), args.seed)
        if len(train) and len(val):
            out.append(Data(name, ids, train.reset_index(drop=True), val.reset_index(drop=True),
                            test.reset_index(drop=True)))
    return out, skipped


# ------------------------------------------------------------------------------------------- model side


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def restored_grads(model: torch.nn.Module) -> Iterator[None]:
    """peft freezes the base: hand it back with its original requires_grad flags."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))


def extract(model, tok, data: list[Data], cfg: TrainConfig, args, init_adapter: Path | None = None
            ) -> tuple[FeatureSet, float]:
    """(features of every train + val example at θ0, seconds). θ0's LoRA is the one train_adapter starts from:
    fresh (B = 0, features of the B gradients) or init_adapter (a meta-initialization: A and B gradients)."""
    sync(args.device)
    t0 = time.perf_counter()
    train, val = {}, {}
    with restored_grads(model):
        peft = (add_lora(model, r=cfg.r, alpha=cfg.alpha, target_modules=cfg.target_modules,
                         dropout=cfg.dropout, seed=cfg.seed) if init_adapter is None
                else load_adapter(model, init_adapter))
        try:
            proj = Projection.for_model(peft, d=args.d, seed=args.seed)
            for ds in data:
                for split, frame, out in (("train", ds.train, train), ("val", ds.val, val)):
                    out[ds.name] = compute_features(peft, tok, frame["prompt"].tolist(), frame["label_id"].tolist(),
                                                    ds.label_ids, proj, batch_size=args.feature_batch_size,
                                                    max_length=args.max_length)
        finally:
            peft.unload()  # the base must be clean again for train_adapter
    sync(args.device)
    return FeatureSet.from_arrays(train, val), time.perf_counter() - t0


def real_log_odds(model, tok, ds: Data, args) -> np.ndarray:
    """Gold-label log-odds f of the fine-tuned model on ds's validation split."""
    lp = predict_logprobs(model, tok, ds.val["prompt"].tolist(), ds.label_ids, batch_size=args.eval_batch_size,
                          max_length=args.max_length)
    return log_odds_from_logprobs(lp, ds.val["label_id"].to_numpy())


def finetune(model, tok, by_name: dict[str, Data], subset: Subset, cfg: TrainConfig, args, tmp: Path,
             init_adapter: Path | None = None) -> dict:
    """Fine-tune a LoRA (fresh, or from init_adapter) on the subset's train examples; real val loss/accuracy
    of every member."""
    examples = [TrainExample(p, int(y), tuple(by_name[m].label_ids))
                for m in subset.members for p, y in zip(by_name[m].train["prompt"], by_name[m].train["label_id"])]
    out_dir = tmp / subset.id  # fresh folder: train_adapter would otherwise resume a finished run
    sync(args.device)
    t0 = time.perf_counter()
    res = train_adapter((model, tok), examples, cfg, out_dir, init_adapter=init_adapter)
    sync(args.device)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    true = {}
    with restored_grads(model):
        pm = load_adapter(model, out_dir).eval()
        try:
            for m in subset.members:
                f = real_log_odds(pm, tok, by_name[m], args)
                true[m] = {"loss": float(np.logaddexp(0.0, -f).mean()), "accuracy": float((f > 0).mean())}
        finally:
            pm.unload()
    sync(args.device)
    return {"train_s": res.seconds, "train_wall_s": wall, "eval_s": time.perf_counter() - t1, "steps": res.steps,
            "n_train": len(examples), "final_train_loss": res.final_loss, "true": true}


# ---------------------------------------------------------------------------------------- estimate side


def estimates(features: FeatureSet, subsets: Sequence[Subset], lam: float) -> tuple[pd.DataFrame, float, bool]:
    """(est rows for members only, seconds for fit + score, all converged)."""
    t0 = time.perf_counter()
    fit = solve_subsets(features, subsets, lam=lam)
    df = score(features, subsets, fit.W)
    secs = time.perf_counter() - t0
    return df[df["in_subset"]].reset_index(drop=True), secs, bool(fit.converged.all())


def zero_shot(features: FeatureSet) -> dict[str, dict[str, float]]:
    """θ0's own val loss/accuracy per dataset (f = f0): the naive 'nothing changes' estimate."""
    return {n: {"loss": float(np.logaddexp(0.0, -s.f0).mean()), "accuracy": float((s.f0 > 0).mean())}
            for n, s in features.val.items()}


def pair_table(est: pd.DataFrame, runs: dict[str, dict], zs: dict, subsets: Sequence[Subset]) -> pd.DataFrame:
    """One row per (subset, member): zero-shot, estimated and true loss/accuracy."""
    e = est.set_index(["subset_id", "dataset"])
    rows = []
    for s in subsets:
        for m in s.members:
            t = runs[s.id]["true"][m]
            rows.append({"subset_id": s.id, "members": list(s.members), "dataset": m,
                         "zero_shot_loss": zs[m]["loss"], "est_loss": float(e.loc[(s.id, m), "est_loss"]),
                         "true_loss": t["loss"], "zero_shot_accuracy": zs[m]["accuracy"],
                         "est_accuracy": float(e.loc[(s.id, m), "est_accuracy"]), "true_accuracy": t["accuracy"]})
    return pd.DataFrame(rows)


def metrics(pairs: pd.DataFrame, col: str = "est") -> dict[str, float]:
    """Fidelity of `col`_loss / `col`_accuracy against the true values over all (subset, member) pairs."""
    true_l, est_l = pairs["true_loss"].to_numpy(), pairs[f"{col}_loss"].to_numpy()
    rel = np.abs(est_l - true_l) / true_l
    rho = spearmanr(est_l, true_l).statistic if len(pairs) > 2 else float("nan")
    return {"mean_relative_error_loss": float(rel.mean()), "median_relative_error_loss": float(np.median(rel)),
            "spearman_loss": float(rho),
            "mean_abs_error_accuracy": float(np.abs(pairs[f"{col}_accuracy"] - pairs["true_accuracy"]).mean())}


def change_spearman(pairs: pd.DataFrame) -> float:
    """Does the estimate predict the CHANGE from θ0? Spearman of (est − zero-shot) vs (true − zero-shot)."""
    if len(pairs) < 3:
        return float("nan")
    return float(spearmanr(pairs["est_loss"] - pairs["zero_shot_loss"],
                           pairs["true_loss"] - pairs["zero_shot_loss"]).statistic)


def lam_search(features, cal: list[Subset], ev: list[Subset], runs, zs, grid) -> tuple[float, list[dict]]:
    """Choose λ on the calibration subsets only; the eval errors per λ are recorded, never used to choose."""
    table = []
    for lam in grid:
        try:
            est, _, conv = estimates(features, cal + ev, lam)
        except FloatingPointError as e:  # λ too small for these features
            table.append({"lam": lam, "error": str(e)})
            continue
        row = {"lam": lam, "converged": conv}
        for role, subs in (("calibration", cal), ("eval", ev)):
            if subs:
                row[role] = metrics(pair_table(est, runs, zs, subs))
        table.append(row)
    ok = [r for r in table if "calibration" in r]
    if not ok:
        raise RuntimeError("no λ in the grid could be solved")
    best = min(ok, key=lambda r: r["calibration"]["mean_relative_error_loss"])
    return best["lam"], table


# --------------------------------------------------------------------------------------------------- run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct | tiny | HF folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="demo", choices=["demo", "full"], help="data/<preset> (built if missing)")
    src.add_argument("--data", type=Path, default=None, help="a data pack folder (datasets.yaml + files)")
    p.add_argument("--n-subsets", type=int, default=10, help="subsets reported (>= 8)")
    p.add_argument("--n-calibration", type=int, default=2, help="extra subsets, fine-tuned only to choose λ")
    p.add_argument("--subset-size", type=int, default=3)
    p.add_argument("--max-train-per-dataset", type=int, default=None)
    p.add_argument("--max-val-per-dataset", type=int, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size")
    p.add_argument("--feature-batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--d", type=int, default=200, help="projection dimension")
    p.add_argument("--lam", type=float, default=None, help="fix λ instead of choosing it on the calibration subsets")
    p.add_argument("--lam-grid", type=lambda s: tuple(float(x) for x in s.split(",")), default=LAM_GRID)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dump", type=Path, default=None, help="also save raw features and real results here")
    a = p.parse_args(argv)
    if a.n_subsets < 8:
        p.error("--n-subsets must be >= 8")
    if a.n_calibration < (0 if a.lam is not None else 1):
        p.error("--n-calibration must be >= 1 unless --lam is given")
    return a


def machine(device: str) -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()}
    import peft
    import transformers
    info.update(transformers=transformers.__version__, peft=peft.__version__)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def print_table(pairs: pd.DataFrame, head: dict, base: dict, timing: dict, lam: float) -> None:
    cols = ["subset_id", "dataset", "zero_shot_loss", "est_loss", "true_loss", "est_accuracy", "true_accuracy"]
    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        print(pairs[cols].to_string(index=False))
    print(f"\nλ = {lam:g}   pairs = {len(pairs)}")
    print(f"{'':28}{'rel.err loss':>14}{'spearman loss':>15}{'abs.err acc':>13}")
    for name, m in (("GradEx estimate", head), ("zero-shot θ0 (baseline)", base)):
        print(f"{name:28}{m['mean_relative_error_loss']:>14.3f}{m['spearman_loss']:>15.3f}"
              f"{m['mean_abs_error_accuracy']:>13.3f}")
    print(f"extract {timing['extract_s']:.1f} s + estimate {timing['estimate_s']:.3f} s vs fine-tune "
          f"{timing['finetune_s']:.1f} s -> speedup x{timing['speedup']:.1f}")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    dev_kind = args.device.split(":")[0]
    out = args.out or ROOT / "benchmarks" / "results" / f"estimation_fidelity_{dev_kind}.json"
    dtype = getattr(torch, args.dtype)
    t_load = time.perf_counter()
    model, tok = load_base_model(args.model, dtype=dtype, device=args.device)
    load_s = time.perf_counter() - t_load
    folder = data_folder(args)
    data, skipped = load_data(folder, tok, args)
    by_name = {d.name: d for d in data}
    need = args.n_subsets + args.n_calibration
    print(f"{len(data)} datasets from {folder} ({len(skipped)} skipped), model loaded in {load_s:.1f} s", flush=True)
    cfg = TrainConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"), lr=args.lr, epochs=args.epochs,
                      batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                      warmup_ratio=0.0)

    features, extract_s = extract(model, tok, data, cfg, args)
    print(f"features of {sum(len(d.train) + len(d.val) for d in data)} examples in {extract_s:.1f} s", flush=True)
    subsets = make_subsets(sorted(by_name), n_random=need, size=args.subset_size, seed=args.seed,
                           include_singletons=False, include_pairs=False)
    cal, ev = subsets[:args.n_calibration], subsets[args.n_calibration:]

    runs = {}
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        for i, s in enumerate(cal + ev):
            runs[s.id] = finetune(model, tok, by_name, s, cfg, args, Path(tmp))
            r = runs[s.id]
            print(f"[{i + 1}/{need}] {'cal ' if s in cal else 'eval'} {','.join(s.members)}: {r['steps']} steps "
                  f"{r['train_s']:.1f} s, train loss {r['final_train_loss']:.3f}", flush=True)

    if args.dump is not None:
        dump_raw(args.dump, features, runs, subsets)
    zs = zero_shot(features)
    grid = (args.lam,) if args.lam is not None else tuple(args.lam_grid)
    lam, lam_table = lam_search(features, cal, ev, runs, zs, grid)
    estimates(features, ev, lam)  # warm-up, so estimate_s is not the first call's one-off setup
    est, estimate_s, converged = estimates(features, ev, lam)
    pairs = pair_table(est, runs, zs, ev)
    head, base = metrics(pairs), metrics(pairs, "zero_shot")

    finetune_s = sum(runs[s.id]["train_s"] for s in ev)
    eval_s = sum(runs[s.id]["eval_s"] for s in ev)
    timing = {"extract_s": extract_s, "estimate_s": estimate_s, "finetune_s": finetune_s,
              "finetune_wall_s": sum(runs[s.id]["train_wall_s"] for s in ev), "real_eval_s": eval_s,
              "speedup": finetune_s / (extract_s + estimate_s),
              "speedup_incl_eval": (finetune_s + eval_s) / (extract_s + estimate_s),
              "finetune_s_per_subset": finetune_s / len(ev), "model_load_s": load_s}
    timing["counted"] = (
        "speedup = finetune_s / (extract_s + estimate_s) over the n_subsets reported subsets. finetune_s = the "
        "training loops of their real fine-tunes (TrainResult.seconds: forward/backward/optimizer steps and the "
        "per-epoch checkpoints; finetune_wall_s adds train_adapter's setup and the final save). extract_s = the "
        "features of EVERY dataset's train and validation examples (one-off: reused by any number of subsets). "
        "estimate_s = fitting and scoring the reported subsets at the chosen λ (warm). Not counted on either side: "
        "model loading, the calibration fine-tunes and the λ grid search, and the real models' validation passes "
        "(real_eval_s; speedup_incl_eval adds them to the fine-tuning side).")
    per_subset = [{"subset_id": s.id, "members": list(s.members), "role": "calibration" if s in cal else "eval",
                   **{k: v for k, v in runs[s.id].items() if k != "true"}} for s in cal + ev]
    result = {
        "benchmark": "estimation_fidelity",
        "device": dev_kind, "machine": machine(args.device), "model": args.model, "dtype": args.dtype,
        "data": _rel(folder),
        "n_subsets": len(ev), "n_pairs": len(pairs), "subset_size": args.subset_size, "seed": args.seed,
        "sizes": {d.name: {"train": len(d.train), "val": len(d.val)} for d in data},
        "skipped_datasets": skipped,
        "finetune": {**asdict(cfg), "target_modules": list(cfg.target_modules)},
        "lr": args.lr, "epochs": args.epochs, "d": args.d,
        "data_preset": _manifest_preset(folder),
        "lam": lam, "lam_grid": list(grid), "lam_at_grid_edge": len(grid) > 1 and lam in (min(grid), max(grid)),
        "lam_choice": ("fixed by --lam" if args.lam is not None else
                       f"argmin over the grid of mean_relative_error_loss on {len(cal)} calibration subsets "
                       "(fine-tuned too, not among the reported ones)"),
        "calibration_subsets": [list(s.members) for s in cal],
        "estimator_converged": converged,
        **head, "spearman_loss_change": change_spearman(pairs),
        "zero_shot_baseline": base,
        "timing": timing, **{k: timing[k] for k in ("extract_s", "estimate_s", "finetune_s", "speedup")},
        "lam_table": lam_table,
        "per_subset": per_subset,
        "pairs": pairs.to_dict(orient="records"),
        "definitions": (
            "Per (subset, member dataset) on that dataset's validation split: loss = mean log(1 + exp(-f)), "
            "accuracy = mean(f > 0), f = gold-label log-odds over the dataset's label words' first tokens. "
            "est: f = f0 + g^T w_S (GradEx); true: f of the LoRA really fine-tuned on the subset's train examples; "
            "zero_shot: f = f0 (theta0, no fine-tuning). mean_relative_error_loss = mean |est - true| / true; "
            "spearman_loss over all pairs (mixes datasets, so between-dataset difficulty counts; compare with the "
            "zero-shot baseline's); spearman_loss_change = Spearman of (est - zero_shot) vs (true - zero_shot)."),
    }
    print_table(pairs, head, base, timing, lam)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    print(f"wrote {out}")
    return result


def _rel(path: Path) -> str:
    p = path.resolve()
    return str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)


def dump_raw(folder: Path, features: FeatureSet, runs: dict, subsets: Sequence[Subset]) -> None:
    """Features and real results before any analysis, so a crash later loses no device time."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"{sp}__{n}__{k}": getattr(s, k) for sp, dd in (("train", features.train), ("val", features.val))
              for n, s in dd.items() for k in ("f0", "G")}
    np.savez_compressed(folder / "fidelity_features.npz", **arrays)
    raw = {"subsets": [list(s.members) for s in subsets], "runs": runs}
    (folder / "fidelity_runs.json").write_text(json.dumps(raw, indent=1, default=_jsonable))


def _manifest_preset(folder: Path) -> str | None:
    """The preset a `grouplora data build` pack was made with (manifest.json), if any."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("preset")
    except (OSError, ValueError):
        return None


def _jsonable(x):
    if x is pd.NA:
        return None
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    main()
