"""Boosting rounds for groups whose held-out error stays high (the ACL 2025 ensemble's boosting).

Gradient boosting on the label logits of a group. The group adapter gives logits z_g(x); round r adds a weak
learner h_r fitted to the residual of the current prediction, with a step size η:

    F_0 = z_g,    F_r = F_{r-1} + η ρ_r h_r,    up to R rounds (`boost_group`),

with ρ_r the line search of gradient boosting (Friedman): the multiplier of h_r that minimizes the group's TRAINING
loss (a weak learner's raw scale is arbitrary, e.g. a ridge fit extrapolated through the real model), and η the
shrinkage. BoostResult.step_sizes are the η ρ_r of the kept rounds.

A round is tried only while the group's loss on held-out examples (the selection fold of validation) stays above
a threshold, and kept only if that loss drops (keep_round); the first rejected round ends the group's boosting
(the residual it was fit to does not change). h_r is what round r's adapter adds to the logits of the point it
starts from: h_r = z(θ_r) − z(θ_ref).

* ridge (no training; the GradEx first-order view): around θ0 the gold log-odds are f(θ0 + Pw) ≈ f0 + G w, with G
  (N, d) the projected gradients of the group's train examples. w = ridge fit of G to the residuals
  r = σ(−m) (the negative logistic-loss gradient at the current margins m of F), written as the adapter θ0 + Pw;
  θ_ref = θ0.
* trained: a fresh LoRA trained on the group's train examples with the current prediction as a fixed logit
  offset, i.e. on the loss CE(F(x) + h(x), y): the adapter learns the residual (examples the ensemble already
  gets right carry almost no gradient); θ_ref = the bare base model. Its training FLOPs count.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import scipy.linalg
import torch
from scipy.special import log_softmax

from grouplora.ml.atomic import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class Projection(Protocol):
    def unproject(self, w: np.ndarray) -> Mapping[str, torch.Tensor]:
        """(d,) -> {name: delta}; name is a LoRA weight ('...q_proj.lora_B.weight', any peft prefix or
        adapter segment) or a base Linear module ('model.layers.0.self_attn.q_proj') for a full ΔW."""
        ...


# ------------------------------------------------------------------------------------------ cheap


def negative_gradient(margins: np.ndarray) -> np.ndarray:
    """−dℓ/dm of the logistic loss ℓ(m) = log(1 + e^{−m}) at margins m: σ(−m) ∈ (0, 1)."""
    return 1.0 / (1.0 + np.exp(np.asarray(margins, dtype=np.float64)))


def ridge_boost(G: np.ndarray, residuals: np.ndarray, lam: float,
                sample_weight: np.ndarray | None = None) -> np.ndarray:
    """w = argmin Σ_i s_i (G_i·w − r_i)² + λ‖w‖² (s = sample_weight, default 1); λ = 0 gives min-norm LS."""
    G = np.asarray(G, dtype=np.float64)
    r = np.asarray(residuals, dtype=np.float64)
    if G.ndim != 2 or r.shape != (G.shape[0],):
        raise ValueError(f"need G (N, d) and residuals (N,), got {G.shape} and {r.shape}")
    if lam < 0:
        raise ValueError("lam must be >= 0")
    if sample_weight is not None:
        s = np.sqrt(np.asarray(sample_weight, dtype=np.float64))
        G, r = G * s[:, None], r * s
    N, d = G.shape
    if lam == 0:
        return np.linalg.lstsq(G, r, rcond=None)[0]
    if d <= N:  # primal: (GᵀG + λI) w = Gᵀr
        return scipy.linalg.solve(G.T @ G + lam * np.eye(d), G.T @ r, assume_a="pos")
    # dual, cheaper when d > N (projected gradients are often wider than a group): w = Gᵀ(GGᵀ + λI)⁻¹r
    return G.T @ scipy.linalg.solve(G @ G.T + lam * np.eye(N), r, assume_a="pos")


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+?)\.(?P<ab>lora_[AB])(?:\.(?!weight$)[^.]+)?(?:\.weight)?$")


def _split_deltas(deltas: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> ({peft saved key: delta} for LoRA factors, {base module name: ΔW} for full weights)."""
    lora, full = {}, {}
    for name, t in deltas.items():
        t = torch.as_tensor(t).detach().to("cpu", torch.float32)
        m = _LORA_KEY.match(name)
        if m:
            lora[f"base_model.model.{m['mod']}.{m['ab']}.weight"] = t
        else:
            mod = name.removeprefix("base_model.model.").removesuffix(".weight")
            full[mod] = t
    return lora, full


def boost_adapter_from_w(base_adapter_dir: Path | None, projection: Projection, w: np.ndarray, out_dir: Path, *,
                         r: int = 8, base_model_name_or_path: str = "") -> Path:
    """Write a peft adapter folder whose weights are θ0 + P w (P w = projection.unproject(w)).

    base_adapter_dir: the adapter θ0 the gradients were taken at (for a fresh LoRA, B = 0 and only the
    lora_B deltas are non-zero); deltas must name its LoRA factors.
    None: θ0 = the bare base model. Deltas naming base Linear modules (full ΔW) are factored by truncated
    SVD into rank-r LoRA factors (lora_alpha = r, so scaling 1); deltas naming LoRA factors are used as-is.
    """
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    lora, full = _split_deltas(projection.unproject(np.asarray(w)))
    out_dir = Path(out_dir)
    if base_adapter_dir is not None:
        if full:
            raise ValueError(f"full-weight deltas {sorted(full)[:3]} need base_adapter_dir=None")
        base = Path(base_adapter_dir)
        state = load_file(base / ADAPTER_WEIGHTS)
        for k, d in lora.items():
            if k not in state:
                raise KeyError(f"{k} is not a weight of the adapter in {base}")
            if state[k].shape != d.shape:
                raise ValueError(f"{k}: delta {tuple(d.shape)} != weight {tuple(state[k].shape)}")
            state[k] = (state[k].float() + d).to(state[k].dtype)
        config = json.loads((base / ADAPTER_CONFIG).read_text())
    else:
        state = dict(lora)
        for mod, dW in full.items():
            if dW.ndim != 2:
                raise ValueError(f"{mod}: ΔW must be (out, in), got {tuple(dW.shape)}")
            U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
            k = min(r, S.numel())
            root = S[:k].sqrt()
            B, A = (U[:, :k] * root).float(), (root[:, None] * Vh[:k]).float()
            if k < r:  # pad to rank r so every module shares one r
                B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], 1)
                A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], 0)
            state[f"base_model.model.{mod}.lora_A.weight"] = A.contiguous()
            state[f"base_model.model.{mod}.lora_B.weight"] = B.contiguous()
        modules = sorted({k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in state})
        ranks = {state[f"base_model.model.{m}.lora_A.weight"].shape[0] for m in modules
                 if f"base_model.model.{m}.lora_A.weight" in state}
        if len(ranks) != 1 or any(f"base_model.model.{m}.lora_{ab}.weight" not in state for m in modules
                                  for ab in "AB"):
            raise ValueError("without a base adapter the deltas must give both LoRA factors of one rank per module")
        rank = ranks.pop()
        # Exact module names, so peft adds LoRA to these modules only.
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, lora_dropout=0.0, bias="none",
                            base_model_name_or_path=base_model_name_or_path or None,
                            task_type="CAUSAL_LM").to_dict()
        config = json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


# ---------------------------------------------------------------------------------------- trained


def keep_round(val_loss_before: float, val_loss_after: float, min_gain: float = 0.0) -> bool:
    """Keep a boosting round only if validation loss drops by more than min_gain (NaN after = reject)."""
    if not np.isfinite(val_loss_after):
        return False
    return bool(val_loss_before - val_loss_after > min_gain)


# ------------------------------------------------------------------------------------ boosting rounds


@dataclass(frozen=True)
class BoostSettings:
    mode: str = "ridge"  # ridge (no training) | trained (a residual-fitting adapter; its FLOPs count)
    rounds: int = 3  # R: at most this many rounds per group (0: no boosting)
    eta: float = 0.5  # step size: F ← F + η h
    threshold: float = 0.2  # boost while the group's held-out mean cross-entropy stays above this
    min_gain: float = 1e-3  # keep a round only if held-out mean CE drops by more than this (not by noise)
    line_search: bool = True  # ρ_r = argmin of the train loss of F + ρ h_r (else ρ_r = 1)
    linear_tol: float = 0.3  # ridge: shrink w (×1/4) until the real Δf on train is within this of Gw
    max_shrinks: int = 6
    check_examples: int = 64  # ridge: train examples the trust-region check scores per try (0: all of them)
    ridge_lam: float = 0.1  # ridge: λ relative to the mean eigenvalue of GᵀG (trace(GᵀG)/d)
    train_epochs: int = 1  # trained: epochs of each round's adapter
    train_max_steps: int | None = None  # trained: cap on its optimizer steps (FLOPs budget)

    def __post_init__(self) -> None:
        if self.mode not in ("ridge", "trained"):
            raise ValueError(f"boost mode {self.mode!r}: use ridge or trained")
        if self.rounds < 0 or not (self.eta > 0) or self.ridge_lam <= 0:
            raise ValueError("need rounds >= 0, eta > 0 and ridge_lam > 0")


@dataclass
class BoostRound:
    index: int  # 1-based
    adapter_dir: str
    kept: bool
    loss_before: float  # held-out (selection fold) mean CE of F before the round
    loss_after: float  # ... of F + η h
    accuracy_before: float
    accuracy_after: float
    flops: int = 0  # training FLOPs (0 for ridge)
    steps: int = 0
    seconds: float = 0.0
    w_norm: float = float("nan")  # ridge: ‖w‖
    rho: float = 1.0  # the round's line-search multiplier (on train): it is added as η ρ h
    linearity_error: float = float("nan")  # ridge: ‖real Δf − Gw‖ / ‖Gw‖ on train at the kept step


@dataclass
class BoostResult:
    """One group's boosting: the rounds tried (kept ones first, at most one rejected one last)."""

    group: str
    mode: str
    eta: float
    reference: str | None  # θ_ref the rounds' logits are taken against (None: the bare base model)
    select_loss: float  # the group adapter's held-out loss (what the threshold is compared with)
    rounds: list[BoostRound] = field(default_factory=list)
    stop: str = ""  # why it stopped: below threshold, rejected round, max rounds, disabled

    @property
    def kept(self) -> list[BoostRound]:
        return [r for r in self.rounds if r.kept]

    @property
    def step_sizes(self) -> list[float]:
        """η ρ_r of each kept round: F = z_g + Σ_r step_r h_r."""
        return [self.eta * r.rho for r in self.kept]

    @property
    def flops(self) -> int:
        return int(sum(r.flops for r in self.rounds))  # rejected rounds were paid for too

    @property
    def steps(self) -> int:
        return int(sum(r.steps for r in self.rounds))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BoostResult":
        d = dict(d)
        d["rounds"] = [BoostRound(**r) for r in d.get("rounds", [])]
        return cls(**d)


@dataclass
class RidgeBase:
    """What ridge rounds need: θ0's adapter folder, the projection its features were taken with, and the
    projected gradients of the group's train examples at θ0 ({dataset: (N, d)}, rows in train order)."""

    theta0_dir: Path
    projection: Projection
    train_features: Mapping[str, np.ndarray]
    r: int = 8


def logprobs_by_dataset(model, tokenizer, adapter_dir: Path | None, examples: Mapping[str, Sequence], *,
                        batch_size: int = 32, max_length: int = 256) -> dict[str, np.ndarray]:
    """{dataset: (N, C) label log-probs} of the model with `adapter_dir` applied (None: the bare model); every
    dataset's examples share its label_ids."""
    from grouplora.ml.lora import applied_adapter
    from grouplora.ml.scoring import predict_logprobs

    out = {}
    with applied_adapter(model, adapter_dir) as pm:
        for name, ex in examples.items():
            if not len(ex):
                out[name] = np.zeros((0, 0), dtype=np.float32)
                continue
            out[name] = predict_logprobs(pm, tokenizer, [e.prompt for e in ex], list(ex[0].label_ids),
                                         batch_size=batch_size, max_length=max_length)
    return out


def labels_of(examples: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    return {n: np.array([e.label_index for e in ex], dtype=np.int64) for n, ex in examples.items()}


def pooled_loss(logits: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of softmax(logits) over every example of every dataset, pooled."""
    ce, hit = [], []
    for n, z in logits.items():
        if len(labels[n]) == 0:
            continue
        lp = log_softmax(np.asarray(z, dtype=np.float64), axis=-1)
        ce.append(-lp[np.arange(len(labels[n])), labels[n]])
        hit.append(lp.argmax(-1) == labels[n])
    if not ce:
        return float("nan"), float("nan")
    return float(np.concatenate(ce).mean()), float(np.concatenate(hit).mean())


def gold_margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """f = log p_y − log(1 − p_y) under softmax(logits): the gold label's log-odds."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    gold = lp[np.arange(len(labels)), labels]
    other = np.log(-np.expm1(np.minimum(gold, -1e-12)))
    return gold - other


def _relative_ridge(G: np.ndarray, r: np.ndarray, rel_lam: float) -> np.ndarray:
    scale = float((G.astype(np.float64) ** 2).sum()) / G.shape[1]  # trace(GᵀG)/d: the mean eigenvalue
    return ridge_boost(G, r, rel_lam * max(scale, 1e-12))


def boost_group(model, tokenizer, group: str, group_adapter: Path, train: Mapping[str, Sequence],
                select: Mapping[str, Sequence], settings: BoostSettings, out_dir: Path, *,
                ridge: RidgeBase | None = None, config=None, batch_size: int = 32, max_length: int = 256,
                reference_logprobs: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None = None,
                select_logprobs: Mapping[str, np.ndarray] | None = None, log=print) -> BoostResult:
    """Boost one group (see the module doc): residual rounds with step η while its selection-fold loss stays
    above settings.threshold, each kept only if that loss drops; round r's adapter goes to out_dir/round_<r>.

    train / select: {member: examples} (TrainExample), the group's train examples and the selection fold of its
    validation. ridge: needed in ridge mode. config: the TrainConfig of trained rounds (epochs and max_steps
    come from settings). reference_logprobs: (train, select) {member: (N, C)} label log-probs of θ_ref (θ0 in
    ridge mode, the bare base when trained) already computed elsewhere, e.g. the stored zero-shot scores when
    θ_ref computes the base's function (a fresh LoRA has B = 0): used instead of scoring θ_ref again.
    select_logprobs: {member: (N, C)} the group adapter's own log-probs on `select`, already computed (its
    training's best-epoch evaluation, ml.training.validation_logprobs): not scored again."""
    if settings.mode == "ridge" and ridge is None:
        raise ValueError("ridge boosting needs a RidgeBase (θ0, projection, train features)")
    if settings.mode == "trained" and config is None:
        raise ValueError("trained boosting needs the TrainConfig")
    out_dir = Path(out_dir)
    kw = {"batch_size": batch_size, "max_length": max_length}
    y_tr, y_sel = labels_of(train), labels_of(select)
    F_sel = (_checked(select_logprobs, select, "group adapter, select") if select_logprobs is not None
             else logprobs_by_dataset(model, tokenizer, group_adapter, select, **kw))
    loss, acc = pooled_loss(F_sel, y_sel)
    reference = str(ridge.theta0_dir) if settings.mode == "ridge" else None
    res = BoostResult(group=group, mode=settings.mode, eta=settings.eta, reference=reference, select_loss=loss)
    if settings.rounds == 0:
        res.stop = "disabled"
        return res
    if not loss > settings.threshold:  # no round at all: train is never scored
        res.stop = _below(loss, settings.threshold)
        return res
    F_tr = logprobs_by_dataset(model, tokenizer, group_adapter, train, **kw)
    if reference_logprobs is not None:
        ref_tr, ref_sel = (_checked(z, ex, what) for z, ex, what in
                           zip(reference_logprobs, (train, select), ("reference, train", "reference, select")))
    else:
        ref_dir = None if reference is None else Path(reference)
        ref_tr = logprobs_by_dataset(model, tokenizer, ref_dir, train, **kw)
        ref_sel = logprobs_by_dataset(model, tokenizer, ref_dir, select, **kw)
    for k in range(1, settings.rounds + 1):
        if not loss > settings.threshold:
            res.stop = _below(loss, settings.threshold)
            break
        t0 = time.perf_counter()
        rdir = out_dir / f"round_{k}"
        flops = steps = 0
        w_norm = lin_err = float("nan")
        scale, h_tr = 1.0, None
        if settings.mode == "ridge":
            names = list(train)
            margins = np.concatenate([gold_margins(F_tr[n], y_tr[n]) for n in names])
            G = np.concatenate([np.asarray(ridge.train_features[n]) for n in names])
            if G.shape[0] != margins.shape[0]:
                raise ValueError(f"group {group}: {G.shape[0]} feature rows for {margins.shape[0]} train examples")
            w = _relative_ridge(G, negative_gradient(margins), settings.ridge_lam)
            # θ0 + Pw leaves the linear regime fast: P's columns are random directions, so ‖Pw‖ is ~√(D/d)
            # times the step that would move f by Gw. Shrink w until the real change of the gold log-odds at θ0
            # on these examples matches Gw (a trust region for the linearization); ρ then scales the function.
            # The check scores the first rows of each member (a few dozen examples), not all of train: each try
            # is a forward pass, and only the accepted w needs its full h on train (below).
            head = _head_counts({n: len(train[n]) for n in names}, settings.check_examples)
            sub = {n: train[n][:head[n]] for n in names}
            f_ref = np.concatenate([gold_margins(ref_tr[n][:head[n]], y_tr[n][:head[n]]) for n in names])
            G_sub = np.concatenate([np.asarray(ridge.train_features[n])[:head[n]] for n in names]).astype(np.float64)
            for attempt in range(settings.max_shrinks + 1):
                boost_adapter_from_w(ridge.theta0_dir, ridge.projection, w * scale, rdir, r=ridge.r)
                h_sub = logprobs_by_dataset(model, tokenizer, rdir, sub, **kw)
                real = np.concatenate([gold_margins(h_sub[n], y_tr[n][:head[n]]) for n in names]) - f_ref
                pred = G_sub @ (w * scale)
                lin_err = float(np.linalg.norm(real - pred) / max(np.linalg.norm(pred), 1e-12))
                if lin_err <= settings.linear_tol or attempt == settings.max_shrinks:
                    break  # (the adapter on disk is w * scale either way)
                scale *= 0.25
            w_norm = float(np.linalg.norm(w * scale))
            # h on all of train: the head rows were just scored with this very adapter; score only the rest
            rest = {n: train[n][head[n]:] for n in names}
            z_rest = logprobs_by_dataset(model, tokenizer, rdir, {n: ex for n, ex in rest.items() if len(ex)}, **kw)
            h_tr = _minus({n: np.concatenate([h_sub[n], z_rest[n]]) if n in z_rest else h_sub[n] for n in names},
                          ref_tr)
        else:
            from grouplora.ml.training import TrainConfig, train_adapter
            cfg = TrainConfig(**{**config.__dict__, "epochs": settings.train_epochs,
                                 "max_steps": settings.train_max_steps})
            names = list(train)
            ex = [e for n in names for e in train[n]]
            # rows, not one array: members may have different class counts
            off = [row for n in names for row in _pad(F_tr[n] - ref_tr[n])]
            vex = [e for n in select for e in select[n]]
            voff = [row for n in select for row in _pad(F_sel[n] - ref_sel[n])]
            tr = train_adapter((model, tokenizer), ex, cfg, rdir, logit_offsets=off,
                               val_examples=vex or None, val_logit_offsets=voff if vex else None,
                               eval_batch_size=batch_size)
            flops, steps = tr.flops, tr.steps
        if h_tr is None:
            h_tr = _minus(logprobs_by_dataset(model, tokenizer, rdir, train, **kw), ref_tr)
        h_sel = _minus(logprobs_by_dataset(model, tokenizer, rdir, select, **kw), ref_sel)
        rho = line_search(F_tr, h_tr, y_tr, max_rho=20.0 / scale) if settings.line_search else 1.0
        step = settings.eta * rho
        new_sel = {n: F_sel[n] + step * h_sel[n] for n in F_sel}
        loss_after, acc_after = pooled_loss(new_sel, y_sel)
        kept = keep_round(loss, loss_after, settings.min_gain)
        res.rounds.append(BoostRound(k, str(rdir), kept, loss, loss_after, acc, acc_after, flops, steps,
                                     time.perf_counter() - t0, w_norm, rho, lin_err))
        log(f"boost {group} round {k} ({settings.mode}, ρ {rho:.3g}): held-out loss {loss:.4f} -> {loss_after:.4f} "
            f"({'kept' if kept else 'rejected'})")
        if not kept:
            res.stop = "round rejected: held-out loss did not drop"
            break
        F_sel = new_sel
        F_tr = {n: F_tr[n] + step * h_tr[n] for n in F_tr}
        loss, acc = loss_after, acc_after
    else:
        res.stop = f"{settings.rounds} rounds"
    return res


def _below(loss: float, threshold: float) -> str:
    return f"held-out loss {loss:.4f} <= threshold {threshold}"


def _checked(logprobs: Mapping[str, np.ndarray], examples: Mapping[str, Sequence], what: str
             ) -> dict[str, np.ndarray]:
    """Given log-probs, checked to cover every member's examples (rows) and label words (columns)."""
    out = {}
    for n, ex in examples.items():
        if n not in logprobs:
            raise KeyError(f"given log-probs ({what}) have no dataset {n!r}")
        z = np.asarray(logprobs[n])
        want = (len(ex), len(ex[0].label_ids) if len(ex) else z.shape[-1])
        if z.shape != want:
            raise ValueError(f"given log-probs ({what}) of {n!r}: shape {z.shape}, need {want}")
        out[n] = z
    return out


def _head_counts(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """How many leading rows of each member make about `total` rows in all, spread evenly (0: every row)."""
    if total <= 0 or sum(sizes.values()) <= total:
        return dict(sizes)
    per = max(1, -(-total // len(sizes)))
    return {n: min(m, per) for n, m in sizes.items()}


def round_logits(model, tokenizer, result: BoostResult, examples: Mapping[str, Sequence], *,
                 batch_size: int = 32, max_length: int = 256) -> list[dict[str, np.ndarray]]:
    """h_r = z(θ_r) − z(θ_ref) of every KEPT round on `examples` ({dataset: examples}), in round order."""
    kw = {"batch_size": batch_size, "max_length": max_length}
    if not result.kept:
        return []
    ref = logprobs_by_dataset(model, tokenizer, None if result.reference is None else Path(result.reference),
                              examples, **kw)
    return [_minus(logprobs_by_dataset(model, tokenizer, Path(r.adapter_dir), examples, **kw), ref)
            for r in result.kept]


def line_search(F: Mapping[str, np.ndarray], h: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                max_rho: float = 20.0) -> float:
    """ρ ∈ [0, max_rho] minimizing the pooled cross-entropy of F + ρ h (convex in ρ): gradient boosting's line
    search, on the data the learner was fit to."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda r: pooled_loss({n: F[n] + r * h[n] for n in F}, labels)[0], bounds=(0.0, max_rho),
                          method="bounded", options={"xatol": 1e-4})
    return float(res.x)


def step_list(steps: float | Sequence[float], n: int) -> list[float]:
    """A step size per round: one η for all, or one each (BoostResult.step_sizes)."""
    if isinstance(steps, (int, float, np.floating)):
        return [float(steps)] * n
    steps = [float(x) for x in steps]
    if len(steps) != n:
        raise ValueError(f"{len(steps)} step sizes for {n} rounds")
    return steps


def boosted_logits(group_logits: np.ndarray, rounds: Sequence[np.ndarray], steps: float | Sequence[float]
                   ) -> np.ndarray:
    """F = z_g + Σ_r step_r h_r (steps: η for every round, or BoostResult.step_sizes)."""
    out = np.asarray(group_logits, dtype=np.float64).copy()
    for h, st in zip(rounds, step_list(steps, len(rounds))):
        out += st * np.asarray(h, dtype=np.float64)
    return out


def _minus(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.asarray(a[n], dtype=np.float64) - np.asarray(b[n], dtype=np.float64) for n in a}


def _pad(z: np.ndarray) -> np.ndarray:
    """Row-centre (softmax-invariant) so that offsets stay small numbers."""
    z = np.asarray(z, dtype=np.float64)
    return z - z.mean(axis=1, keepdims=True) if z.size else z
