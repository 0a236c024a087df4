"""Choose the estimator's λ against real fine-tunes, at the θ0 the estimates are taken at.

A few small subsets are really fine-tuned from θ0 (the same recipe as any adapter) and every member dataset's
validation loss is measured: mean log(1 + exp(−f)) with f the real gold-label log-odds, which is the mean
cross-entropy over the dataset's label words. The first-order estimates of the same subsets are computed on a
λ grid; per λ the table holds the mean / median relative loss error, Spearman of estimated vs real loss and the
mean absolute accuracy error; λ is the grid value with the lowest mean relative error. A pinned λ overrides the
choice (the table is still computed when real fine-tunes are given, so the pinned value's error is visible).

θ0 is recorded with the result: "fresh_lora" (base + untrained LoRA, B = 0) or "meta_init" (a trained adapter,
e.g. one adapter on all datasets). The estimates are only as good as the linearization at that point, so a λ
calibrated at one θ0 says nothing about the other.

Used by the calibration step of the pipeline and by benchmarks/estimation_fidelity.py (one piece of code).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from grouplora.ml.estimation import FeatureSet, score, solve_subsets
from grouplora.ml.lora import applied_adapter
from grouplora.ml.subsets import Subset, make_subsets
from grouplora.ml.training import TrainConfig, TrainExample, evaluate, train_adapter

LAM_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
THETA0 = ("fresh_lora", "meta_init")
LN2 = math.log(2.0)

# truth: {subset_id: {member dataset: {"loss": real val loss, "accuracy": real val accuracy}}}
Truth = Mapping[str, Mapping[str, Mapping[str, float]]]


# ------------------------------------------------------------------------------------------- real side


def calibration_subsets(names: Sequence[str], n: int, *, size: int = 3, seed: int = 1) -> list[Subset]:
    """n distinct random subsets of `size` datasets (fewer datasets than size: all of them, once)."""
    size = min(size, len(names))
    n = min(n, math.comb(len(names), size))
    return make_subsets(list(names), n_random=n, size=size, seed=seed, include_singletons=False,
                        include_pairs=False)


def member_ce(model, tokenizer, adapter_dir: Path | None,
              folds: Mapping[str, Mapping[str, Sequence[TrainExample]]], members: Sequence[str], *,
              batch_size: int = 32, max_length: int = 256) -> dict[str, dict[str, np.ndarray]]:
    """{fold: {member: per-example cross-entropy over its label words}} of the model with `adapter_dir` applied
    (once) on each member's examples of every fold. Per example, ce = log(1 + exp(−f)), f the gold log-odds."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with applied_adapter(model, adapter_dir) as pm:
        for fold, val in folds.items():
            out[fold] = {m: evaluate(pm, tokenizer, val[m], batch_size=batch_size, max_length=max_length)[0]
                         for m in members}
    return out


def ce_summary(ce: np.ndarray) -> dict[str, float]:
    """{loss, accuracy, n} of per-example cross-entropies: loss = mean ce; accuracy = mean(ce < ln 2) (f > 0)."""
    return {"loss": float(ce.mean()), "accuracy": float((ce < LN2).mean()), "n": len(ce)}


def member_losses(model, tokenizer, adapter_dir: Path | None, val: Mapping[str, Sequence[TrainExample]],
                  members: Sequence[str], *, batch_size: int = 32, max_length: int = 256) -> dict[str, dict]:
    """{member: {loss, accuracy, n}} of the model with `adapter_dir` applied on each member's validation examples:
    loss = mean cross-entropy over its label words = mean log(1 + exp(−f)); accuracy = mean(f > 0); n examples."""
    ce = member_ce(model, tokenizer, adapter_dir, {"val": val}, members, batch_size=batch_size,
                   max_length=max_length)["val"]
    return {m: ce_summary(c) for m, c in ce.items()}


def finetune_subset(model, tokenizer, subset: Subset, train: Mapping[str, Sequence[TrainExample]],
                    val: Mapping[str, Sequence[TrainExample]], config: TrainConfig, out_dir: Path, *,
                    init_adapter: Path | None = None, eval_batch_size: int = 32,
                    more_folds: Mapping[str, Mapping[str, Sequence[TrainExample]]] | None = None) -> dict[str, Any]:
    """Really fine-tune θ0 (fresh LoRA or init_adapter) on the subset's train examples; its members' real
    validation loss/accuracy under "true", and the run's cost (steps, FLOPs, seconds). more_folds: further
    {fold: {member: examples}} scored by the same fine-tune; then "ce" holds {fold: {member: per-example
    cross-entropy}} for "val" and each of them (numpy arrays: the caller stores them).

    No checkpoint choice here: the estimator predicts the result of the recipe's run, not of its best epoch
    on data it was never shown."""
    examples = [e for m in subset.members for e in train[m]]
    res = train_adapter((model, tokenizer), examples, config, Path(out_dir), init_adapter=init_adapter)
    t = time.perf_counter()
    ce = member_ce(model, tokenizer, Path(out_dir), {"val": val, **(more_folds or {})}, subset.members,
                   batch_size=eval_batch_size, max_length=config.max_length)
    out = {"true": {m: ce_summary(c) for m, c in ce["val"].items()}, "train_s": res.seconds,
           "eval_s": time.perf_counter() - t, "steps": res.steps, "flops": res.flops, "n_train": len(examples),
           "final_train_loss": res.final_loss}
    return {**out, "ce": ce} if more_folds else out


# -------------------------------------------------------------------------------------- estimate side


def member_estimates(features: FeatureSet, subsets: Sequence[Subset], lam: float) -> tuple[pd.DataFrame, float, bool]:
    """(estimate rows of the subsets' members only, seconds for fit + score, all converged)."""
    t0 = time.perf_counter()
    fit = solve_subsets(features, subsets, lam=lam)
    df = score(features, subsets, fit.W)
    secs = time.perf_counter() - t0
    return df[df["in_subset"]].reset_index(drop=True), secs, bool(fit.converged.all())


def unchanged(features: FeatureSet) -> dict[str, dict[str, float]]:
    """θ0's own validation loss/accuracy per dataset (f = f0): the naive "nothing changes" estimate."""
    return {n: {"loss": float(np.logaddexp(0.0, -s.f0).mean()), "accuracy": float((s.f0 > 0).mean())}
            for n, s in features.val.items()}


def pair_table(est: pd.DataFrame, truth: Truth, zs: Mapping[str, Mapping[str, float]],
               subsets: Sequence[Subset]) -> pd.DataFrame:
    """One row per (subset, member): unchanged-θ0 ("zero_shot"), estimated and true loss/accuracy."""
    e = est.set_index(["subset_id", "dataset"])
    rows = []
    for s in subsets:
        for m in s.members:
            t = truth[s.id][m]
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


def mean_truth(truths: Sequence[Truth]) -> dict[str, dict[str, dict[str, float]]]:
    """The truth averaged over training seeds: per subset and member, the mean loss and accuracy of the runs
    (each a Truth over the same subsets and members); n stays the examples' count."""
    first = truths[0]
    return {sid: {m: {"loss": float(np.mean([t[sid][m]["loss"] for t in truths])),
                      "accuracy": float(np.mean([t[sid][m]["accuracy"] for t in truths])),
                      "n": first[sid][m].get("n", 0)} for m in members} for sid, members in first.items()}


def seed_spread(truths: Mapping[str, Truth], subsets: Sequence[Subset]) -> dict[str, float]:
    """How far one run's truth is from another's: metrics() of every ordered pair of runs, one judged against the
    other, averaged over the pairs (needs two runs at least). No estimator can be judged finer than this."""
    keys = sorted(truths)
    rows = [{"est_loss": truths[b][s.id][m]["loss"], "true_loss": truths[a][s.id][m]["loss"],
             "est_accuracy": truths[b][s.id][m]["accuracy"], "true_accuracy": truths[a][s.id][m]["accuracy"]}
            for a in keys for b in keys if a != b for s in subsets for m in s.members]
    pairs = pd.DataFrame(rows)
    out = {k: v for k, v in metrics(pairs).items() if k != "spearman_loss"}
    return {**out, "runs": keys, "n_pairs": len(rows)}


def change_spearman(pairs: pd.DataFrame) -> float:
    """Does the estimate predict the CHANGE from θ0? Spearman of (est − unchanged) vs (true − unchanged)."""
    if len(pairs) < 3:
        return float("nan")
    return float(spearmanr(pairs["est_loss"] - pairs["zero_shot_loss"],
                           pairs["true_loss"] - pairs["zero_shot_loss"]).statistic)


def error_table(features: FeatureSet, truth: Truth, grid: Sequence[float],
                roles: Mapping[str, Sequence[Subset]]) -> list[dict]:
    """Per λ in grid: {"lam", "converged", <role>: metrics(...)} for each role's subsets (e.g. calibration and
    eval); {"lam", "error"} where λ is too small for these features."""
    zs = unchanged(features)
    every = [s for subs in roles.values() for s in subs]
    table = []
    for lam in grid:
        try:
            est, _, conv = member_estimates(features, every, lam)
        except FloatingPointError as e:
            table.append({"lam": float(lam), "error": str(e)})
            continue
        row: dict[str, Any] = {"lam": float(lam), "converged": conv}
        for role, subs in roles.items():
            if subs:
                row[role] = metrics(pair_table(est, truth, zs, subs))
        table.append(row)
    return table


def choose_lam(table: Sequence[Mapping], role: str = "calibration") -> float:
    """The λ with the lowest mean relative loss error on `role` (the smaller λ on a tie)."""
    ok = [r for r in table if role in r and np.isfinite(r[role]["mean_relative_error_loss"])]
    if not ok:
        raise RuntimeError("no λ in the grid could be solved")
    return float(min(ok, key=lambda r: (r[role]["mean_relative_error_loss"], r["lam"]))["lam"])


# --------------------------------------------------------------------------------------------- result


@dataclass
class Calibration:
    """The estimator setting the estimates use, and how it was chosen."""

    lam: float
    theta0: str  # "fresh_lora" | "meta_init"
    source: str  # "calibrated" (lowest mean relative error on the grid) | "pinned" (given by the user)
    grid: list[float] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)  # error_table rows (role "calibration")
    subsets: list[list[str]] = field(default_factory=list)
    n_pairs: int = 0
    at_grid_edge: bool = False  # the chosen λ is the smallest or largest grid value: widen the grid

    def __post_init__(self) -> None:
        if self.theta0 not in THETA0:
            raise ValueError(f"theta0 must be one of {THETA0}, got {self.theta0!r}")
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"λ must be finite and > 0, got {self.lam}")

    def frame(self) -> pd.DataFrame:
        """One row per λ: mean / median relative loss error, Spearman, mean abs accuracy error, converged."""
        rows = []
        for r in self.table:
            m = r.get("calibration", {})
            rows.append({"lam": r["lam"], **m, "converged": r.get("converged", False), "error": r.get("error", "")})
        return pd.DataFrame(rows)

    def at_lam(self) -> dict[str, float]:
        """The calibration metrics at the chosen λ ({} if it was not on the table)."""
        for r in self.table:
            if math.isclose(r["lam"], self.lam) and "calibration" in r:
                return dict(r["calibration"])
        return {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        return cls(**dict(d))


def calibrate(features: FeatureSet, subsets: Sequence[Subset], truth: Truth, *, theta0: str,
              grid: Sequence[float] = LAM_GRID, pinned_lam: float | None = None) -> Calibration:
    """λ with the lowest mean relative loss error of the estimates of `subsets` against their real fine-tunes
    (`truth`), or `pinned_lam` when given (then `subsets`/`truth` may be empty: no table)."""
    grid = sorted({float(x) for x in grid} | ({float(pinned_lam)} if pinned_lam is not None else set()))
    subsets = list(subsets)
    table = error_table(features, truth, grid, {"calibration": subsets}) if subsets else []
    if pinned_lam is not None:
        lam, source = float(pinned_lam), "pinned"
    else:
        if not subsets:
            raise ValueError("calibration needs real fine-tunes of at least one subset, or a pinned λ")
        lam, source = choose_lam(table), "calibrated"
    return Calibration(lam=lam, theta0=theta0, source=source, grid=grid, table=table,
                       subsets=[list(s.members) for s in subsets], n_pairs=sum(len(s) for s in subsets),
                       at_grid_edge=source == "calibrated" and len(grid) > 1 and lam in (grid[0], grid[-1]))


def calibrate_by_finetuning(model, tokenizer, features: FeatureSet, train: Mapping[str, Sequence[TrainExample]],
                            val: Mapping[str, Sequence[TrainExample]], config: TrainConfig, work_dir: Path, *,
                            theta0: str, init_adapter: Path | None, n_subsets: int, size: int = 3, seed: int = 1,
                            grid: Sequence[float] = LAM_GRID, pinned_lam: float | None = None,
                            eval_batch_size: int = 32, log=print) -> tuple[Calibration, dict[str, dict]]:
    """The calibration step, as the pipeline and the benchmarks run it: `n_subsets` random subsets of `size`
    datasets really fine-tuned from θ0 (`init_adapter`; work_dir/<subset id>), then `calibrate`. A `pinned_lam`
    is used as given (source "pinned"); with n_subsets = 0 too nothing is fine-tuned (no error table).

    train / val: {dataset: examples}; val must be the examples the features' validation rows are (the estimator
    predicts the loss on exactly those). Returns (Calibration, {subset id: the run's cost and true losses})."""
    if pinned_lam is not None and n_subsets < 1:
        return calibrate(features, [], {}, theta0=theta0, grid=grid, pinned_lam=pinned_lam), {}
    if n_subsets < 1:
        raise ValueError("calibration needs at least one subset to fine-tune, or a pinned λ")
    subsets = calibration_subsets(list(features.names), n_subsets, size=size, seed=seed)
    truth, runs = {}, {}
    for i, s in enumerate(subsets):
        r = finetune_subset(model, tokenizer, s, train, val, config, Path(work_dir) / s.id, init_adapter=init_adapter,
                            eval_batch_size=eval_batch_size)
        truth[s.id], runs[s.id] = r["true"], {"members": list(s.members), **r}
        log(f"calibration [{i + 1}/{len(subsets)}] {', '.join(s.members)}: {r['steps']} steps in "
            f"{r['train_s']:.1f}s, true loss " + ", ".join(f"{m} {v['loss']:.3f}" for m, v in r["true"].items()))
    return calibrate(features, subsets, truth, theta0=theta0, grid=grid, pinned_lam=pinned_lam), runs
