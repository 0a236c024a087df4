"""How close are GradEx estimates to real fine-tuning? Estimate K random subsets of datasets, then really
fine-tune a LoRA on each, and compare every member dataset's validation loss and accuracy.

One process: (1) θ0 = base + fresh LoRA, projected gradient features of every train + validation example;
(2) estimate the subsets (regularised logistic fit per subset, scored under f = f0 + gᵀw); (3) fine-tune a fresh
LoRA per subset with train_adapter (same r, alpha, targets and seed as θ0) and score its real log-odds f;
(4) compare on the SAME definitions: loss = mean log(1 + exp(−f)), accuracy = mean(f > 0). The fine-tunes,
the estimates, the error table and the choice of λ are ml.calibration's (the pipeline's calibration step).

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

from grouplora.ml.calibration import (LAM_GRID, change_spearman, choose_lam, error_table, finetune_subset,  # noqa: F401
                                      member_estimates as estimates, metrics, pair_table, unchanged as zero_shot)
from grouplora.ml.data_format import classes_for, discover, load_dataset, load_suite_config
from grouplora.ml.estimation import FeatureSet
from grouplora.ml.features import compute_features
from grouplora.ml.folds import weights_fold_mask
from grouplora.ml.lora import add_lora, load_adapter
from grouplora.ml.model import label_token_ids, load_base_model
from grouplora.ml.projection import Projection
from grouplora.ml.subsets import Subset, make_subsets
from grouplora.ml.training import TrainConfig, TrainExample

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    """One dataset, capped: prompts and gold label indices per split, and its label words' first tokens."""

    name: str
    label_ids: list[int]
    train: pd.DataFrame  # columns prompt, label_id
    val: pd.DataFrame
    test: pd.DataFrame | None = None
    select: pd.DataFrame | None = None  # validation's selection fold (split_folds): checkpoints, λ, boosting
    weights: pd.DataFrame | None = None  # validation's weights fold: the ensemble weights only


def split_folds(data: list[Data], *, weights_share: float = 0.5, seed: int = 0) -> list[Data]:
    """Fill each dataset's select / weights folds of validation (ml.folds: label-stratified, deterministic)."""
    for d in data:
        mask = weights_fold_mask(d.val["label_id"].to_numpy(), weights_share=weights_share, seed=seed)
        d.select, d.weights = d.val[~mask].reset_index(drop=True), d.val[mask].reset_index(drop=True)
    return data


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


def extract(model, tok, data: list[Data], cfg: TrainConfig, args, init_adapter: Path | None = None,
            val_split: str = "val") -> tuple[FeatureSet, float]:
    """(features of every train + `val_split` example at θ0, seconds). θ0's LoRA is the one train_adapter starts
    from: fresh (B = 0, features of the B gradients) or init_adapter (a meta-initialization: A and B gradients)."""
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
                for split, frame, out in (("train", ds.train, train), ("val", getattr(ds, val_split), val)):
                    out[ds.name] = compute_features(peft, tok, frame["prompt"].tolist(), frame["label_id"].tolist(),
                                                    ds.label_ids, proj, batch_size=args.feature_batch_size,
                                                    max_length=args.max_length)
        finally:
            peft.unload()  # the base must be clean again for train_adapter
    sync(args.device)
    return FeatureSet.from_arrays(train, val), time.perf_counter() - t0


def examples_of(ds: Data, split: str) -> list[TrainExample]:
    frame = getattr(ds, split)
    return [TrainExample(p, int(y), tuple(ds.label_ids)) for p, y in zip(frame["prompt"], frame["label_id"])]


def finetune(model, tok, by_name: dict[str, Data], subset: Subset, cfg: TrainConfig, args, tmp: Path,
             init_adapter: Path | None = None, val_split: str = "val") -> dict:
    """ml.calibration.finetune_subset on a fresh folder (a finished one would be returned as it is): the
    subset's real fine-tune and its members' real loss/accuracy on `val_split` under "true". val_split must be
    the split the features' validation rows were taken on (extract's val_split): the estimate and the truth are
    then means over the same examples."""
    members = {m: by_name[m] for m in subset.members}
    sync(args.device)
    t0 = time.perf_counter()
    r = finetune_subset(model, tok, subset, {m: examples_of(d, "train") for m, d in members.items()},
                        {m: examples_of(d, val_split) for m, d in members.items()}, cfg, tmp / subset.id,
                        init_adapter=init_adapter, eval_batch_size=args.eval_batch_size)
    sync(args.device)
    return {**r, "train_wall_s": time.perf_counter() - t0 - r["eval_s"]}


# ---------------------------------------------------------------------------------------- estimate side


def lam_search(features, cal: list[Subset], ev: list[Subset], runs, zs, grid) -> tuple[float, list[dict]]:
    """Choose λ on the calibration subsets only; the eval errors per λ are recorded, never used to choose."""
    table = error_table(features, {k: v["true"] for k, v in runs.items()}, grid, {"calibration": cal, "eval": ev})
    return choose_lam(table), table


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
