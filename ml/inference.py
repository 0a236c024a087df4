"""Several LoRA adapters on one base at inference: all of them in one forward, or merged into one adapter.

One pass. A dataset's ensemble needs the label log-probs of each of its K adapters on the same prompts. Instead
of K forwards (set_adapter, forward, repeat), `mixed_logprobs` runs ONE forward per batch through peft's
mixed-adapter batches: the batch's B prompts are repeated once per adapter (K·B rows; row block k belongs to
adapter k) and every LoRA layer adds adapter k's delta to block k only (`LoraLayer.forward(adapter_names=)`).
What that can and cannot save: a LoRA delta changes every hidden state after its layer, so each adapter needs
its own activations through the whole stack, and the base matmuls run on K·B rows: the same FLOPs as K
forwards. The one pass saves the K−1 extra walks through the model (per-module dispatch, kernel launches,
reading every base weight again), which is most of the cost at serving batch sizes and on a GPU, and little
of it in a large CPU batch. Only an approximation gets a single adapter's cost: the merge below.

Merge. α-weighted logits Σ_k α_k z(θ0 + Δ_k) ≈ (Σα)·z(θ0 + Σ_k ŵ_k Δ_k) with ŵ = α/Σα, exact to first order in
the Δ_k (each z is linear in its Δ there). `merge_adapters` builds that ONE adapter, ΔW = Σ_k ŵ_k B_k A_k s_k,
with peft's add_weighted_adapter, combination_type "cat": A stacks the ŵ_k s_k A_k and B the B_k side by side,
so B'A' is exactly that sum (rank Σ r_k, still tiny next to the base matmuls). "linear" instead sums the A's
and the B's separately, (Σ_k √(ŵ_k s_k) B_k)(Σ_j √(ŵ_j s_j) A_j): cross terms B_k A_j (k ≠ j), and even for
one adapter merged with itself (Σ√ŵ_k)² ≠ Σŵ_k; it is exact for a single adapter only, whatever the ranks.
The scale Σα is the ensemble's temperature: applied to the merged adapter's logits it keeps the probabilities
on the ensemble's scale (argmax does not depend on it).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from grouplora.ml.scoring import encode, label_logits, length_batches, model_device, prompt_lengths

MERGE_TYPES = ("cat", "linear")


@contextmanager
def adapter_rows(pm: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within the block, row i of any forward through `pm` uses adapter names[i] (peft's mixed-adapter batch).

    The same as PeftModel.forward(adapter_names=...) but for any submodule call (we run the decoder alone, so
    that the full-vocabulary logits are never formed); the hooks go away even if the forward raises."""
    from peft.tuners.lora import LoraLayer

    known = set(getattr(pm, "peft_config", {}))
    unknown = sorted(set(names) - known - {"__base__"})
    if unknown:
        raise ValueError(f"no adapter(s) {unknown} loaded; loaded: {sorted(known)}")
    if pm.training:
        raise ValueError("mixed-adapter batches are for inference: call .eval() first")
    names = list(names)

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [m.register_forward_pre_hook(inject, with_kwargs=True) for m in pm.modules()
               if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mixed_logprobs(pm: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   label_ids: Sequence[int], adapters: Sequence[str], *, batch_size: int | None = 16,
                   max_length: int = 256, max_tokens: int | None = None, progress: bool = False) -> np.ndarray:
    """(K, N, C) label log-probs of each loaded peft adapter on prompts, ONE forward per batch of prompts.

    A forward holds K·B rows (B prompts × K adapters): B ≤ batch_size prompts of similar length, and
    K·B·(their padded length) ≤ max_tokens (the budget is for the whole forward)."""
    K, dev = len(adapters), model_device(pm)
    lab = torch.as_tensor(list(label_ids), device=dev)
    out = np.zeros((K, len(prompts), len(lab)), dtype=np.float32)
    if K == 0 or not prompts:
        return out
    budget = max(1, max_tokens // K) if max_tokens else None
    batches = length_batches(prompt_lengths(tokenizer, prompts, max_length), batch_size, max_tokens=budget)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"scoring {K} adapters in one pass", unit="batch")
    for idx in batches:
        enc = encode(tokenizer, [prompts[i] for i in idx], max_length)
        ids = enc["input_ids"].to(dev).repeat(K, 1)  # block k = rows k·B … (k+1)·B − 1
        mask = enc["attention_mask"].to(dev).repeat(K, 1)
        with adapter_rows(pm, [a for a in adapters for _ in idx]):
            z = label_logits(pm, ids, mask, lab)
        out[:, idx] = torch.log_softmax(z, dim=-1).view(K, len(idx), -1).cpu().numpy()
    return out


def merged_name(weights: Mapping[str, float], combination_type: str) -> str:
    """A peft adapter name for this exact merge: another weighting never reuses a stale merged adapter."""
    key = repr((combination_type, sorted((k, round(float(w), 12)) for k, w in weights.items())))
    return "merged_" + hashlib.sha1(key.encode()).hexdigest()[:12]


def merge_adapters(pm, weights: Mapping[str, float], *, combination_type: str = "cat",
                   normalize: bool = True) -> tuple[str, float]:
    """(name of ONE loaded adapter ≈ the α-weighted ensemble of the named loaded adapters, temperature Σα).

    Adds the adapter θ0 + Σ ŵ_k Δ_k (ŵ = α/Σα, see the module docstring) to `pm` unless it is there already;
    a single adapter with α > 0 is used as it is. Serve it with temperature·logits.
    normalize=False: the weights are the ŵ_k themselves (any sign, e.g. −ŵ for a boosting round's reference;
    ml.ensemble.merge_weights) and the temperature returned is 1."""
    if combination_type not in MERGE_TYPES:
        raise ValueError(f"combination_type {combination_type!r}: use one of {MERGE_TYPES}")
    w = {k: float(a) for k, a in weights.items() if (a > 0 if normalize else a != 0)}
    if not any(a > 0 for a in w.values()) or not all(np.isfinite(list(w.values()))):
        raise ValueError(f"need at least one finite weight > 0, got {dict(weights)}")
    unknown = sorted(set(w) - set(pm.peft_config))
    if unknown:
        raise ValueError(f"no adapter(s) {unknown} loaded; loaded: {sorted(pm.peft_config)}")
    total = sum(w.values()) if normalize else 1.0
    if len(w) == 1 and (normalize or next(iter(w.values())) == 1.0):
        return next(iter(w)), total
    if any(getattr(pm.peft_config[k], "use_rslora", False) for k in w):
        # add_weighted_adapter gives the merged adapter lora_alpha = r, i.e. scaling 1 only without rsLoRA
        raise ValueError("merging rsLoRA adapters is not supported (the merged adapter's scaling would be wrong)")
    name = merged_name(w, combination_type)
    if name not in pm.peft_config:
        pm.add_weighted_adapter(list(w), [a / total for a in w.values()], name, combination_type=combination_type)
    return name, total
