"""Does the selection fold stand for the whole validation split? θ*'s own validation loss on both, per dataset.

The fidelity stage of suite.py compares estimates with real fine-tunes; the estimates score each dataset's
selection fold (the features' validation side). Before session 5 the truth was taken on the whole validation split.
This measures how far apart the two folds already are at θ* itself, with no fine-tuning: a mismatch of that size
enters the error directly. It also checks the stored features: their f0 must give the selection fold's loss.

    python benchmarks/fold_check.py --data .gpu/data/full --work <suite work folder with features_meta.npz and
        adapters/all_s0> --out benchmarks/results/fold_check_cpu.json

Same sizes and seed as suite.py's defaults (300 train / 100 validation, data seed 0, folds weights_share 0.5).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimation_fidelity import examples_of, load_data, machine, split_folds  # noqa: E402

from grouplora.ml.calibration import member_losses  # noqa: E402
from grouplora.ml.model import load_base_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="suite.py work folder (features_meta.npz, adapters/all_s0)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fold_check_cpu.json")
    a = p.parse_args(argv)
    sizes = argparse.Namespace(max_train_per_dataset=300, max_val_per_dataset=100, max_test_per_dataset=300, seed=0)
    t0 = time.perf_counter()
    model, tok = load_base_model(a.model, device=a.device)
    data, _ = load_data(a.data, tok, sizes)
    split_folds(data, weights_share=0.5, seed=0)
    names = [d.name for d in data]
    meta = a.work / "adapters" / "all_s0"
    feats = np.load(a.work / "features_meta.npz")
    loss = {split: member_losses(model, tok, meta, {d.name: examples_of(d, split) for d in data}, names,
                                 max_length=a.max_length) for split in ("val", "select")}
    rows = {}
    for n in names:
        v, s = loss["val"][n]["loss"], loss["select"][n]["loss"]
        rows[n] = {"validation_loss": v, "selection_fold_loss": s, "relative_difference": abs(s - v) / v,
                   "features_selection_fold_loss": float(np.logaddexp(0.0, -feats[f"val/{n}/f0"]).mean()),
                   "n_validation": loss["val"][n]["n"], "n_selection_fold": loss["select"][n]["n"]}
        print(f"{n:22s} validation {v:.3f}  selection fold {s:.3f}  ({rows[n]['relative_difference'] * 100:.0f}%)",
              flush=True)
    rel = [r["relative_difference"] for r in rows.values()]
    out = {"benchmark": "fold_check", "theta": "meta-initialization all_s0 of the suite work folder",
           "device": a.device, "machine": machine(a.device), "work": str(a.work), "per_dataset": rows,
           "mean_relative_difference": float(np.mean(rel)), "max_relative_difference": float(np.max(rel)),
           "max_at": names[int(np.argmax(rel))],
           "features_match": bool(all(abs(r["features_selection_fold_loss"] - r["selection_fold_loss"]) < 1e-2
                                      for r in rows.values())),
           "seconds": time.perf_counter() - t0,
           "command": "python benchmarks/fold_check.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"mean {out['mean_relative_difference'] * 100:.1f}%, max {out['max_relative_difference'] * 100:.0f}% "
          f"({out['max_at']}); features match: {out['features_match']}; wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
