"""Per-dataset weighted ensemble of LoRA adapters (the ACL 2025 ensemble).

For dataset t with adapters k = 1..K the ensemble's label logits are z = Σ_k α_k z_k with α ≥ 0 fitted to
minimise the cross-entropy of softmax(z) (+ a small L2). α is not normalised: its sum acts as a temperature.
Adding a per-row constant to z_k (logits vs log-probs) changes nothing, so the inputs may be either.

The paper's candidates for dataset t (`score_dataset`): its group's adapter z_g and that group's kept boosting
rounds h_1..h_R (ml.boosting: what each round adds to the logits), starting from the boosted combination
α = (1, η, ..., η). α is fit on the WEIGHTS fold of validation (ml.folds), which chose no checkpoint and no
boosting round; if every weight comes out 0 (no candidate beats a uniform guess there) the ensemble falls back to
the group adapter, α = (1, 0, ..., 0). The all-datasets adapter is the baseline it is compared with; as a
candidate it is an explicit option (`include_all`), reported separately as `ensemble_with_all`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax

from grouplora.ml.atomic import write_json
from grouplora.ml.boosting import boosted_logits, step_list
from grouplora.ml.model import label_token_ids, model_fingerprint
from grouplora.ml.scoring import batching, model_device, predict_logprobs

# ----------------------------------------------------------------------------------------- weights


def combine(logits_kNC: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_k α_k logits_k: (K, N, C), (K,) -> (N, C)."""
    logits_kNC = np.asarray(logits_kNC, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if logits_kNC.ndim != 3 or weights.shape != (logits_kNC.shape[0],):
        raise ValueError(f"need (K, N, C) logits and (K,) weights, got {logits_kNC.shape} and {weights.shape}")
    return np.tensordot(weights, logits_kNC, axes=1)


def ensemble_loss(logits_kNC: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Mean cross-entropy of softmax(combine(logits, weights)) against labels."""
    lp = log_softmax(combine(logits_kNC, weights), axis=-1)
    return float(-lp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_weights(logits_kNC: np.ndarray, labels: np.ndarray, *, l2: float = 1e-3,
                init: np.ndarray | None = None) -> np.ndarray:
    """α ≥ 0 (K,) minimising mean CE(softmax(Σ α_k z_k), y) + l2·‖α‖² by L-BFGS-B with bounds."""
    z = np.asarray(logits_kNC, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 3 or z.shape[1] != len(y):
        raise ValueError(f"logits {z.shape} do not match {len(y)} labels")
    K, N, C = z.shape
    if N == 0:
        return np.full(K, 1.0 / K)
    # Row-centre each adapter's logits: softmax-invariant, and keeps log-probs (−20s) from dominating the L2.
    z = z - z.mean(axis=2, keepdims=True)
    onehot = np.eye(C)[y]

    def f(a: np.ndarray) -> tuple[float, np.ndarray]:
        lp = log_softmax(np.tensordot(a, z, axes=1), axis=-1)
        loss = -(lp * onehot).sum() / N + l2 * a @ a
        grad = np.einsum("knc,nc->k", z, np.exp(lp) - onehot) / N + 2 * l2 * a
        return loss, grad

    a0 = np.full(K, 1.0 / K) if init is None else np.asarray(init, dtype=np.float64)
    res = minimize(f, a0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * K)
    return np.clip(res.x, 0.0, None)


def fit_all(per_dataset: Mapping[str, tuple[np.ndarray, np.ndarray]], *, l2: float = 1e-3) -> dict[str, np.ndarray]:
    """{dataset: (logits (K,N,C), labels (N,))} -> {dataset: α (K,)}; K may differ between datasets."""
    return {name: fit_weights(z, y, l2=l2) for name, (z, y) in per_dataset.items()}


def fit_dataset_weights(logits_kNC: np.ndarray, labels: np.ndarray, *, init: np.ndarray | None = None,
                        l2: float = 1e-3) -> tuple[np.ndarray, bool]:
    """(α, fell_back): fit_weights, but never all zero: then α = (1, 0, ..., 0), candidate 0 alone (the group
    adapter)."""
    K = np.asarray(logits_kNC).shape[0]
    alpha = fit_weights(logits_kNC, labels, l2=l2, init=init)
    if K == 0 or not np.all(np.isfinite(alpha)) or not (alpha > 0).any():
        alpha = np.zeros(K)
        if K:
            alpha[0] = 1.0
        return alpha, True
    return alpha, False


def score_dataset(group: Mapping[str, np.ndarray], rounds: Sequence[Mapping[str, np.ndarray]],
                  eta: float | Sequence[float],
                  labels: Mapping[str, np.ndarray], *, all_adapter: Mapping[str, np.ndarray] | None = None,
                  include_all: bool = False, l2: float = 1e-3) -> dict[str, Any]:
    """One dataset's methods, from label logits on two splits, "weights" (the weights fold) and "test":
    group = its group adapter's; rounds = its group's kept boosting rounds (h_r); all_adapter = the
    all-datasets adapter's (the baseline; a candidate only with include_all); eta = the rounds' step sizes (one η,
    or BoostResult.step_sizes = η ρ_r per round).

    Returns {"accuracy": test accuracy per method, "weights_fold_accuracy": the same on the weights fold,
    "weights": α over [group, rounds...], "fallback": bool, and with include_all "weights_with_all",
    "fallback_with_all"}. Methods: grouped (z_g), grouped_boosted (z_g + Σ η ρ_r h_r), ensemble (α fit on the
    weights fold), one_adapter_all and ensemble_with_all when all_adapter is given."""
    def acc(z: np.ndarray, y: np.ndarray) -> float:
        return float((np.asarray(z).argmax(-1) == y).mean()) if len(y) else float("nan")

    if include_all and all_adapter is None:
        raise ValueError("include_all needs the all-datasets adapter's logits")
    out: dict[str, Any] = {"accuracy": {}, "weights_fold_accuracy": {}}
    cands = {sp: np.stack([group[sp], *[h[sp] for h in rounds]]) for sp in ("weights", "test")}
    init = np.array([1.0] + step_list(eta, len(rounds)))  # start from the boosted combination
    alpha, fell_back = fit_dataset_weights(cands["weights"], labels["weights"], init=init, l2=l2)
    out.update(weights=alpha.tolist(), fallback=fell_back)
    for sp, key in (("test", "accuracy"), ("weights", "weights_fold_accuracy")):
        y = labels[sp]
        out[key]["grouped"] = acc(group[sp], y)
        out[key]["grouped_boosted"] = acc(boosted_logits(group[sp], [h[sp] for h in rounds], eta), y)
        out[key]["ensemble"] = acc(combine(cands[sp], alpha), y)
        if all_adapter is not None:
            out[key]["one_adapter_all"] = acc(all_adapter[sp], y)
    if include_all:
        wa = {sp: np.concatenate([cands[sp], all_adapter[sp][None]]) for sp in cands}
        a2, fb2 = fit_dataset_weights(wa["weights"], labels["weights"], init=np.append(init, 1.0), l2=l2)
        out.update(weights_with_all=a2.tolist(), fallback_with_all=fb2)
        for sp, key in (("test", "accuracy"), ("weights", "weights_fold_accuracy")):
            out[key]["ensemble_with_all"] = acc(combine(wa[sp], a2), labels[sp])
    return out


def method_costs(groups: Sequence[Mapping[str, Any]], boosts: Sequence[Any], all_run: Mapping[str, Any]
                 ) -> dict[str, dict[str, Any]]:
    """Training cost behind each method: FLOPs and optimizer steps (training only; the per-epoch validation
    passes are eval_flops), adapters trained or served, peak training memory. groups / all_run: TrainResult
    dicts of the group adapters and the all-datasets adapter; boosts: the groups' ml.boosting.BoostResult
    (ridge rounds train nothing: 0 FLOPs; rejected rounds were paid for too)."""
    def peak(runs: Sequence[Mapping[str, Any]]) -> int:
        return int(max((r.get("peak_memory_bytes", 0) for r in runs), default=0))

    grouped = {"flops": int(sum(r["flops"] for r in groups)), "steps": int(sum(r["steps"] for r in groups)),
               "eval_flops": int(sum(r.get("eval_flops", 0) for r in groups)), "adapters": len(groups),
               "peak_memory_bytes": peak(groups)}
    b_flops, b_steps = int(sum(b.flops for b in boosts)), int(sum(b.steps for b in boosts))
    kept = int(sum(len(b.kept) for b in boosts))
    all_ = {"flops": int(all_run["flops"]), "steps": int(all_run["steps"]),
            "eval_flops": int(all_run.get("eval_flops", 0)), "adapters": 1, "peak_memory_bytes": peak([all_run])}
    ens = {**grouped, "flops": grouped["flops"] + b_flops, "steps": grouped["steps"] + b_steps,
           "adapters": grouped["adapters"] + kept, "boost_flops": b_flops, "boost_steps": b_steps, "rounds_kept": kept}
    with_all = {**ens, "flops": ens["flops"] + all_["flops"], "steps": ens["steps"] + all_["steps"],
                "eval_flops": ens["eval_flops"] + all_["eval_flops"], "adapters": ens["adapters"] + 1,
                "peak_memory_bytes": max(ens["peak_memory_bytes"], all_["peak_memory_bytes"])}
    return {"zero_shot": {"flops": 0, "steps": 0, "eval_flops": 0, "adapters": 0, "peak_memory_bytes": 0},
            "one_adapter_all": all_, "grouped": grouped, "grouped_boosted": ens, "ensemble": ens,
            "ensemble_merged": {**ens, "adapters": 1}, "ensemble_with_all": with_all}


# ------------------------------------------------------------------------------------------ Ensemble


@dataclass
class AdapterSpec:
    name: str
    path: str  # relative paths resolve against the ensemble JSON's folder
    datasets: list[str] = field(default_factory=list)  # the group it was trained on
    # a boosting round (ml.boosting): it contributes z(this) − z(reference), what it adds to the logits of the point
    # it started from; "base" = the bare base model, else another adapter of the ensemble (e.g. θ0 of ridge rounds)
    reference: str | None = None


BASE = "base"  # AdapterSpec.reference of a round trained from a fresh LoRA on the bare base model


@dataclass
class DatasetSpec:
    label_words: list[str]
    template: str = ""
    label_ids: list[int] = field(default_factory=list)  # first token of each label word, for the base tokenizer


@dataclass
class Ensemble:
    base_model: str
    base_fingerprint: str  # model.model_fingerprint of the base; "" = unchecked
    adapters: list[AdapterSpec]
    weights: dict[str, dict[str, float]]  # dataset -> adapter name -> α (missing = 0)
    datasets: dict[str, DatasetSpec]
    meta: dict[str, Any] = field(default_factory=dict)
    root: Path | None = field(default=None, repr=False, compare=False)  # JSON folder, set by load()

    def adapter(self, name: str) -> AdapterSpec:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(f"no adapter {name!r} in the ensemble")

    def adapter_path(self, name: str) -> Path:
        p = Path(self.adapter(name).path)
        return p if p.is_absolute() or self.root is None else self.root / p

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        return d

    def save(self, path: Path) -> Path:
        self._check()
        return write_json(self.to_dict(), Path(path))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], root: Path | None = None) -> "Ensemble":
        e = cls(base_model=d["base_model"], base_fingerprint=d.get("base_fingerprint", ""),
                adapters=[AdapterSpec(**a) for a in d["adapters"]],
                weights={t: {k: float(v) for k, v in w.items()} for t, w in d["weights"].items()},
                datasets={t: DatasetSpec(**s) for t, s in d["datasets"].items()},
                meta=dict(d.get("meta", {})), root=root)
        e._check()
        return e

    @classmethod
    def load(cls, path: Path) -> "Ensemble":
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), root=path.parent.resolve())

    def _check(self) -> None:
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate adapter names in {names}")
        for t, w in self.weights.items():
            unknown = set(w) - set(names)
            if unknown:
                raise ValueError(f"weights for {t!r} name unknown adapters {sorted(unknown)}")
            if any(not np.isfinite(v) or v < 0 for v in w.values()):
                raise ValueError(f"weights for {t!r} must be finite and >= 0: {w}")
        for a in self.adapters:
            if a.reference is not None and a.reference != BASE and a.reference not in names:
                raise ValueError(f"adapter {a.name!r}: reference {a.reference!r} is neither {BASE!r} nor an adapter")


def weights_for(ensemble_adapters: Sequence[str], alpha: np.ndarray) -> dict[str, float]:
    """fit_weights' α in adapter order -> the {name: α} map an Ensemble stores."""
    return {n: float(a) for n, a in zip(ensemble_adapters, alpha, strict=True)}


# ------------------------------------------------------------------------------------------- predict

# id(base model) -> its PeftModel wrapper with every adapter loaded so far. The wrapper holds the base, so
# an entry lives until release(model).
_LOADED: dict[int, Any] = {}


def _cached(model: torch.nn.Module):
    pm = _LOADED.get(id(model))
    return pm if pm is not None and pm.get_base_model() is model else None


def _peft_name(name: str, path: Path) -> str:
    # peft adapter names become module keys: no dots; the path hash keeps two same-named adapters apart.
    return re.sub(r"[^A-Za-z0-9_]", "_", name) + "_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def loaded_model(model: torch.nn.Module, adapters: Mapping[str, Path]):
    """The cached PeftModel around `model` with each {name: path} adapter loaded (loads what is missing)."""
    from peft import PeftModel

    pm = _cached(model)
    for name, path in adapters.items():
        key = _peft_name(name, Path(path))
        if pm is None:
            pm = PeftModel.from_pretrained(model, str(path), adapter_name=key, is_trainable=False)
            pm.eval()
            _LOADED[id(model)] = pm
        elif key not in pm.peft_config:
            pm.load_adapter(str(path), adapter_name=key, is_trainable=False)
    return pm


def release(model: torch.nn.Module) -> None:
    """Unload every cached adapter from `model` (e.g. before training a new adapter on it)."""
    pm = _cached(model)
    if pm is not None:
        pm.unload()
        del _LOADED[id(model)]


def adapter_logprobs(ensemble: Ensemble, model: torch.nn.Module, tokenizer, dataset: str, prompts: list[str],
                     names: Sequence[str], *, batch_size: int | None = None, max_length: int = 256,
                     max_tokens: int | None = None, progress: bool = False, one_pass: bool = True,
                     given: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """(K, N, C) label log-probs of each named adapter on prompts (the input fit_weights wants); for a boosting
    round (AdapterSpec.reference) its log-probs minus its reference's. given: {adapter name or BASE: (N, C)}
    log-probs on these prompts already computed elsewhere (e.g. the stored zero-shot scores as the bare base or
    a fresh θ0): used, not scored again.

    one_pass: all the adapters needed in one forward per batch of prompts (ml.inference.mixed_logprobs);
    False: one adapter after the other (set_adapter), the reference it must equal. Batches by length
    (scoring.batching): at most max_tokens padded tokens per forward (None = the device's budget) and
    batch_size prompts (None = no cap)."""
    from grouplora.ml.inference import mixed_logprobs

    spec = ensemble.datasets[dataset]
    label_ids = spec.label_ids or label_token_ids(tokenizer, spec.label_words)
    refs = {ensemble.adapter(n).reference for n in names} - {None}
    needed = list(dict.fromkeys([*names, *sorted(refs)]))
    raw: dict[str, np.ndarray] = {}
    for n, z in (given or {}).items():
        if n in needed:
            if np.shape(z) != (len(prompts), len(label_ids)):
                raise ValueError(f"given log-probs of {n!r}: shape {np.shape(z)}, "
                                 f"need {(len(prompts), len(label_ids))}")
            raw[n] = np.asarray(z)
    adapters = [n for n in needed if n != BASE and n not in raw]
    pm = loaded_model(model, {n: ensemble.adapter_path(n) for n in adapters})
    kw = dict(max_length=max_length, progress=progress, **batching(model_device(model), batch_size, max_tokens))
    if one_pass and len(adapters) > 1:
        keys = [_peft_name(n, ensemble.adapter_path(n)) for n in adapters]
        raw.update(zip(adapters, mixed_logprobs(pm, tokenizer, prompts, label_ids, keys, **kw)))
    else:
        for n in adapters:
            pm.set_adapter(_peft_name(n, ensemble.adapter_path(n)))
            raw[n] = predict_logprobs(pm, tokenizer, prompts, label_ids, **kw)
    if BASE in needed and BASE not in raw:
        with pm.disable_adapter():
            raw[BASE] = predict_logprobs(pm, tokenizer, prompts, label_ids, **kw)
    out = []
    for n in names:
        ref = ensemble.adapter(n).reference
        out.append(raw[n] if ref is None else raw[n] - raw[ref])
    return np.stack(out) if out else np.zeros((0, len(prompts), len(label_ids)), dtype=np.float32)


def _served_weights(ensemble: Ensemble, model: torch.nn.Module, dataset: str, check_fingerprint: bool
                    ) -> dict[str, float]:
    """{adapter: α > 0} of the dataset, after checking (if asked) that the base is the adapters' base."""
    if dataset not in ensemble.weights:
        raise KeyError(f"the ensemble has no weights for dataset {dataset!r}")
    # Checked on the bare base only: once adapters are loaded its state_dict has LoRA weights in it.
    if check_fingerprint and ensemble.base_fingerprint and _cached(model) is None:
        fp = model_fingerprint(model)
        if fp != ensemble.base_fingerprint:
            raise ValueError(f"base model fingerprint {fp} != the ensemble's {ensemble.base_fingerprint}")
    w = {n: a for n, a in ensemble.weights[dataset].items() if a > 0}
    if not w:
        raise ValueError(f"every adapter weight for {dataset!r} is 0")
    return w


def merge_weights(ensemble: Ensemble, weights: Mapping[str, float]) -> tuple[dict[str, float], float]:
    """({adapter: merge weight ŵ}, temperature T) such that T · z(θ0 + Σ ŵ_k Δ_k) equals the ensemble's
    Σ α_k z_k to first order in the Δ (ml.inference's module doc).

    Without boosting rounds: ŵ = α/Σα, T = Σα. A round (AdapterSpec.reference) contributes z(θ_r) − z(θ_ref),
    which carries no base logits: the anchors (adapters without a reference) set T = Σ α_anchor, every adapter
    gets ŵ = α/T and a round's reference adapter −α_r/T (the bare base has no Δ). When only rounds have α > 0
    there is no first-order match; the plain α/Σα merge is served then (an approximation)."""
    w = {n: float(a) for n, a in weights.items() if a > 0}
    if not w:
        raise ValueError("every adapter weight is 0")
    anchor = sum(a for n, a in w.items() if ensemble.adapter(n).reference is None)
    rounds = [n for n in w if ensemble.adapter(n).reference is not None]
    if not rounds or anchor <= 0:
        total = sum(w.values())
        return {n: a / total for n, a in w.items()}, total
    out = {n: a / anchor for n, a in w.items()}
    for n in rounds:
        ref = ensemble.adapter(n).reference
        if ref != BASE:
            out[ref] = out.get(ref, 0.0) - w[n] / anchor
    return {n: a for n, a in out.items() if a != 0}, anchor


def merged_logprobs(ensemble: Ensemble, model: torch.nn.Module, tokenizer, dataset: str, prompts: list[str], *,
                    weights: Mapping[str, float] | None = None, combination_type: str = "cat",
                    batch_size: int = 16, max_length: int = 256, progress: bool = False,
                    scored: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """(N, C) label log-probs of the dataset's ensemble served as ONE merged adapter (ml.inference.merge_adapters):
    T · z(θ0 + Σ ŵ_k Δ_k) with merge_weights' ŵ and T. weights: {adapter: α}, default the ensemble's for
    dataset (pass them to score a weighting before it is stored in the ensemble). scored: {adapter: (N, C)} its
    own log-probs on these prompts, already computed: when the merge is one of them alone (ŵ = 1, e.g. a
    dataset whose weights kept only its group adapter), it is not scored again."""
    from grouplora.ml.inference import merge_adapters

    spec = ensemble.datasets[dataset]
    label_ids = spec.label_ids or label_token_ids(tokenizer, spec.label_words)
    mw, temperature = merge_weights(ensemble, ensemble.weights[dataset] if weights is None else weights)
    alone = next(iter(mw)) if len(mw) == 1 and next(iter(mw.values())) == 1.0 else None
    if alone is not None and alone in (scored or {}) and ensemble.adapter(alone).reference is None:
        if np.shape(scored[alone]) != (len(prompts), len(label_ids)):
            raise ValueError(f"scored log-probs of {alone!r}: shape {np.shape(scored[alone])}, "
                             f"need {(len(prompts), len(label_ids))}")
        return log_softmax(temperature * np.asarray(scored[alone], dtype=np.float64), axis=-1)
    pm = loaded_model(model, {n: ensemble.adapter_path(n) for n in mw})
    key, _ = merge_adapters(pm, {_peft_name(n, ensemble.adapter_path(n)): a for n, a in mw.items()},
                            combination_type=combination_type, normalize=False)
    pm.set_adapter(key)
    lp = predict_logprobs(pm, tokenizer, prompts, label_ids, batch_size=batch_size, max_length=max_length,
                          progress=progress)
    return log_softmax(temperature * lp.astype(np.float64), axis=-1)  # log-softmax drops lp's row constants


def predict(ensemble: Ensemble, model: torch.nn.Module, tokenizer, dataset: str, prompts: list[str], *,
            batch_size: int = 16, max_length: int = 256, progress: bool = False,
            check_fingerprint: bool = True, merged: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), probs (N, C)) of the dataset's weighted ensemble on prompts; α = 0 adapters are skipped.

    All its adapters run in one pass (adapter_logprobs); merged=True serves the merged adapter instead
    (merged_logprobs: one adapter's cost, an approximation of the ensemble)."""
    w = _served_weights(ensemble, model, dataset, check_fingerprint)
    if merged:
        probs = np.exp(merged_logprobs(ensemble, model, tokenizer, dataset, prompts, weights=w,
                                       batch_size=batch_size, max_length=max_length, progress=progress))
        return probs.argmax(-1), probs
    names = list(w)
    z = adapter_logprobs(ensemble, model, tokenizer, dataset, prompts, names, batch_size=batch_size,
                         max_length=max_length, progress=progress)
    logits = combine(z, np.array([w[n] for n in names]))
    probs = np.exp(log_softmax(logits, axis=-1))
    return probs.argmax(-1), probs
