"""Choose auxiliary datasets for one target dataset (GradEx, EMNLP 2024 §4): estimate, never fine-tune.

Every candidate set S = {target} ∪ A is scored by the target's estimated validation loss after fine-tuning on
S (estimation.solve_subsets + score at θ0, ideally a meta-initialization, so the first-order model is accurate).

* random ensemble: many random auxiliary sets; an auxiliary's score is the mean estimated target performance
  (−loss) over the sets that contain it; keep those above the mean over all sets (they help more than a random
  companion does), best first, at most top_k.
* forward stepwise: start from {target}; add the auxiliary whose addition lowers the estimated target loss most;
  stop when no addition gains more than min_gain, or at max_k.
* baselines: none, all, and top-k by cosine similarity to the target of the mean gradient feature or of the
  mean answer-position hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .estimation import FeatureSet, score, solve_subsets
from .scoring import answer_hidden, model_device, token_batches
from .subsets import Subset, make_subsets

METHODS = ("none", "all", "random_ensemble", "forward_selection", "gradient_cosine", "hidden_cosine")


def _check_target(features: FeatureSet, target: str) -> list[str]:
    """The candidate auxiliaries: every other dataset with training features. target needs validation ones."""
    if target not in features.val or features.val[target].n == 0:
        raise ValueError(f"target {target!r} has no validation features (have: {sorted(features.val)})")
    if target not in features.train:
        raise ValueError(f"target {target!r} has no training features")
    aux = sorted(n for n in features.train if n != target and features.train[n].n > 0)
    if not aux:
        raise ValueError(f"no auxiliary datasets besides {target!r}")
    return aux


def target_estimates(features: FeatureSet, target: str, aux_sets: Sequence[Sequence[str]], *,
                     lam: float = 1e-3, threads: int | None = None) -> pd.DataFrame:
    """One row per aux set: members (aux only), est_loss and est_accuracy of the target after {target} ∪ aux."""
    subsets = [Subset.of([target, *a]) for a in aux_sets]
    fit = solve_subsets(features, subsets, lam=lam, threads=threads)
    df = score(features, subsets, fit.W, threads=threads)
    df = df[df["dataset"] == target].reset_index(drop=True)
    return pd.DataFrame({"aux": [sorted(set(a)) for a in aux_sets], "est_loss": df["est_loss"].to_numpy(),
                         "est_accuracy": df["est_accuracy"].to_numpy()})


def random_aux_sets(aux: Sequence[str], n: int, size: int, seed: int) -> list[list[str]]:
    """Up to n distinct random auxiliary sets of `size` (fewer when fewer exist)."""
    size = max(1, min(size, len(aux)))
    n = min(n, comb(len(aux), size))
    subs = make_subsets(list(aux), n_random=n, size=size, seed=seed, include_singletons=False, include_pairs=False)
    return [list(s.members) for s in subs]


def random_ensemble_scores(features: FeatureSet, target: str, *, n_subsets: int = 200, size: int | None = None,
                           lam: float = 1e-3, seed: int = 0, threads: int | None = None
                           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-auxiliary scores, per-set estimates). score = mean −est_loss of the target over the sets containing
    the auxiliary; contrast = score − mean over the sets without it; n_sets = how many sets contain it."""
    aux = _check_target(features, target)
    size = size or max(1, len(aux) // 3)
    sets = random_aux_sets(aux, n_subsets, size, seed)
    est = target_estimates(features, target, sets, lam=lam, threads=threads)
    perf = -est["est_loss"].to_numpy()
    rows = []
    for a in aux:
        inside = np.array([a in s for s in est["aux"]])
        rows.append({"aux": a, "n_sets": int(inside.sum()),
                     "score": float(perf[inside].mean()) if inside.any() else float("nan"),
                     "contrast": float(perf[inside].mean() - perf[~inside].mean())
                     if inside.any() and (~inside).any() else float("nan")})
    scores = pd.DataFrame(rows).sort_values("score", ascending=False, ignore_index=True)
    scores.attrs["mean_score"] = float(perf.mean())
    return scores, est


def threshold_select(scores: pd.DataFrame, top_k: int | None = None, threshold: float | None = None) -> list[str]:
    """Auxiliaries whose score beats `threshold` (default: the mean over all sampled sets), best first."""
    t = scores.attrs.get("mean_score", float(scores["score"].mean())) if threshold is None else threshold
    keep = scores[scores["score"] > t].sort_values("score", ascending=False)["aux"].tolist()
    return keep[:top_k] if top_k is not None else keep


def forward_selection(features: FeatureSet, target: str, *, max_k: int = 3, min_gain: float = 0.0,
                      lam: float = 1e-3, threads: int | None = None) -> tuple[list[str], pd.DataFrame]:
    """(chosen auxiliaries in order, path: step, added, est_loss, gain). Each step estimates every one-more set."""
    aux = _check_target(features, target)
    chosen: list[str] = []
    current = float(target_estimates(features, target, [[]], lam=lam, threads=threads)["est_loss"][0])
    path = [{"step": 0, "added": "", "est_loss": current, "gain": 0.0}]
    while len(chosen) < max_k:
        left = [a for a in aux if a not in chosen]
        if not left:
            break
        est = target_estimates(features, target, [chosen + [a] for a in left], lam=lam, threads=threads)
        best = int(np.argmin(est["est_loss"].to_numpy()))
        gain = current - float(est["est_loss"][best])
        if gain <= min_gain:
            break
        chosen.append(left[best])
        current -= gain
        path.append({"step": len(chosen), "added": left[best], "est_loss": current, "gain": gain})
    return chosen, pd.DataFrame(path)


def cosine_to(vectors: Mapping[str, np.ndarray], target: str) -> pd.Series:
    """Cosine similarity of every other dataset's vector to the target's, highest first."""
    t = np.asarray(vectors[target], dtype=np.float64)
    out = {}
    for name, v in vectors.items():
        if name == target:
            continue
        v = np.asarray(v, dtype=np.float64)
        out[name] = float(v @ t / max(np.linalg.norm(v) * np.linalg.norm(t), 1e-30))
    return pd.Series(out, name="cosine").sort_values(ascending=False)


def mean_gradients(features: FeatureSet) -> dict[str, np.ndarray]:
    """Each dataset's mean projected gradient feature over its training examples."""
    return {n: s.G.astype(np.float64).mean(0) for n, s in features.train.items() if s.n}


@torch.no_grad()
def mean_hidden_state(model: torch.nn.Module, tokenizer, prompts: list[str], *, batch_size: int = 32,
                      max_length: int = 256) -> np.ndarray:
    """Mean over prompts of the final hidden state at the answer position (the model's view of the task)."""
    if not prompts:
        raise ValueError("mean_hidden_state needs at least one prompt")
    dev = model_device(model)
    total = None
    for _, enc in token_batches(tokenizer, prompts, max_length, batch_size=batch_size):
        h = answer_hidden(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev)).double().sum(0)
        total = h if total is None else total + h
    return (total / len(prompts)).cpu().numpy()


@dataclass
class Selection:
    """Every method's chosen auxiliaries for one target, and the tables behind them."""

    target: str
    chosen: dict[str, list[str]]
    scores: pd.DataFrame  # one row per auxiliary: random-ensemble score/contrast, cosines, forward-selection step
    forward_path: pd.DataFrame
    subset_estimates: pd.DataFrame
    methods: pd.DataFrame  # one row per method: n_aux, the target's est_loss / est_accuracy after its choice, chosen
    settings: dict = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """scores plus one boolean column per method: is this auxiliary chosen by it."""
        t = self.scores.copy()
        for m, chosen in self.chosen.items():
            t[f"chosen_{m}"] = t["aux"].isin(chosen)
        return t


def select_auxiliaries(features: FeatureSet, target: str, *, hidden: Mapping[str, np.ndarray] | None = None,
                       top_k: int = 3, n_subsets: int = 200, size: int | None = None, lam: float = 1e-3,
                       min_gain: float = 0.0, seed: int = 0, threads: int | None = None) -> Selection:
    """Run every method for `target`. hidden: mean hidden state per dataset (hidden_cosine is left out without)."""
    aux = _check_target(features, target)
    scores, sampled = random_ensemble_scores(features, target, n_subsets=n_subsets, size=size, lam=lam, seed=seed,
                                         threads=threads)
    mean_score = scores.attrs["mean_score"]
    fwd, path = forward_selection(features, target, max_k=top_k, min_gain=min_gain, lam=lam, threads=threads)
    grad = cosine_to(mean_gradients(features), target)
    chosen = {"none": [], "all": list(aux), "random_ensemble": threshold_select(scores, top_k),
              "forward_selection": fwd, "gradient_cosine": grad.index[:top_k].tolist()}
    scores = scores.merge(grad.rename("gradient_cosine"), left_on="aux", right_index=True, how="left")
    if hidden is not None:
        hid = cosine_to(hidden, target)
        chosen["hidden_cosine"] = hid.index[:top_k].tolist()
        scores = scores.merge(hid.rename("hidden_cosine"), left_on="aux", right_index=True, how="left")
    step = {a: i + 1 for i, a in enumerate(fwd)}
    scores["forward_step"] = scores["aux"].map(step).astype("Int64")
    names = list(chosen)
    est = target_estimates(features, target, [chosen[m] for m in names], lam=lam, threads=threads)
    methods = pd.DataFrame({"method": names, "n_aux": [len(chosen[m]) for m in names],
                            "est_loss": est["est_loss"], "est_accuracy": est["est_accuracy"],
                            "chosen": [", ".join(chosen[m]) for m in names]})
    settings = {"top_k": top_k, "n_subsets": int(len(sampled)), "size": size or max(1, len(aux) // 3), "lam": lam,
                "min_gain": min_gain, "seed": seed, "mean_score": mean_score}
    return Selection(target, chosen, scores, path, sampled, methods, settings)
