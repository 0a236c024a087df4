"""Projected per-example LoRA gradients from ONE forward and ONE backward per batch.

For a LoRA matrix W (an nn.Linear, y = x Wᵀ) the per-example gradient is G_b = Σ_t δ_bt x_btᵀ with δ = dL/dy.
Examples in a batch are independent, so backpropagating Σ_b f_b gives every δ_b at once. Module hooks catch
x (forward) and δ (a tensor hook on y); each side is projected first, (δ P_out) and (x P_in), and one einsum
gives the (b, d) features: G is never formed, and no per-example parameter gradient exists anywhere.
Hooks only touch the small LoRA Linear layers, so this also works on a 4-bit bitsandbytes base
(torch.func's vmap/grad does not).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from grouplora.ml.lora import lora_modules
from grouplora.ml.projection import Projection
from grouplora.ml.scoring import label_logits, log_odds, model_device, token_batches


class GradientHooks:
    """While active, a forward + backward with `mask` set adds each example's projected gradient to `feats`."""

    def __init__(self, model: torch.nn.Module, projection: Projection):
        modules = lora_modules(model)
        missing = [n for n in projection.names if n not in modules]
        if missing:
            raise ValueError(f"projection names not among the model's LoRA modules: {missing[:3]}")
        frozen = [n for n in projection.names if not modules[n].weight.requires_grad]
        if frozen:
            raise ValueError(f"LoRA weights must be trainable to take their gradients: {frozen[:3]}")
        ckpt = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if ckpt is None:
            ckpt = getattr(model, "is_gradient_checkpointing", False)
        if ckpt:
            raise ValueError("turn gradient checkpointing off: recomputed forwards would fire the hooks twice")
        self.projection = projection
        self.params = [modules[n].weight for n in projection.names]  # what backward must reach
        self.mask: torch.Tensor | None = None
        self.feats: torch.Tensor | None = None
        self._handles = [modules[n].register_forward_hook(self._forward_hook(n)) for n in projection.names]

    def start(self, attention_mask: torch.Tensor) -> None:
        self.mask = attention_mask.float()
        self.feats = torch.zeros(attention_mask.shape[0], self.projection.d, device=attention_mask.device)

    def _forward_hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.mask is None or not (torch.is_grad_enabled() and output.requires_grad):
                return
            # project x now and keep only (b, T, k2); zero the pads so they contribute nothing
            xp = self.projection.project_in(name, args[0]) * self.mask[:, :, None]

            def grad_hook(delta: torch.Tensor | None) -> None:
                if delta is None:  # fail loudly: zeros here would be wrong features, not a crash
                    raise RuntimeError(f"no gradient reached {name}: the graph to it is cut (a base layer "
                                       "without backward, e.g. bnb's CPU inference kernel?)")
                self.feats += self.projection.outer(name, delta, xp)
            output.register_hook(grad_hook)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextmanager
def gradient_hooks(model: torch.nn.Module, projection: Projection) -> Iterator[GradientHooks]:
    hooks = GradientHooks(model, projection)
    try:
        yield hooks
    finally:
        hooks.remove()


def batch_features(model: torch.nn.Module, hooks: GradientHooks, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, labels: torch.Tensor,
                   label_ids: torch.Tensor, *, return_logits: bool = False):
    """(f (b,), features (b, d)) of one batch: one forward, one backward of Σ_b f_b. return_logits: also the
    (b, C) label logits of that same forward, detached (what scoring reads, at no extra cost)."""
    hooks.start(attention_mask)
    z = label_logits(model, input_ids, attention_mask, label_ids)
    f = log_odds(z, labels)
    # autograd.grad rather than .backward(): the same pass, but no .grad is left on the model
    torch.autograd.grad(f.sum(), hooks.params, allow_unused=True)
    feats, hooks.mask, hooks.feats = hooks.feats, None, None
    return (f.detach(), feats, z.detach()) if return_logits else (f.detach(), feats)


def compute_features(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     labels: list[int], label_ids: list[int], projection: Projection, *,
                     batch_size: int | None = 8, max_tokens: int | None = None, max_length: int = 256,
                     return_logprobs: bool = False, progress: bool = False):
    """(f0 (N,), features (N, d) float32) in the prompts' order; f0 = log-odds of the gold label at θ0.

    return_logprobs: (f0, features, logprobs (N, C) float32), the label log-softmax of the same forward: at a
    fresh LoRA (B = 0) θ0 is the base model, so these ARE the zero-shot scores (predict_logprobs on the base),
    with no second pass. Batches: length_batches (batch_size examples and/or max_tokens padded tokens)."""
    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
    dev = model_device(model)
    lab = torch.as_tensor(label_ids, device=dev)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    f0 = np.zeros(len(prompts), dtype=np.float32)
    feats = np.zeros((len(prompts), projection.d), dtype=np.float32)
    logprobs = np.zeros((len(prompts), len(lab)), dtype=np.float32)
    batches = token_batches(tokenizer, prompts, max_length, batch_size=batch_size, max_tokens=max_tokens)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="gradient features", unit="batch")
    was_training = model.training
    model.eval()  # no dropout: f must be the deterministic function being linearised
    try:
        with torch.enable_grad(), gradient_hooks(model, projection) as hooks:
            for idx, enc in batches:
                f, phi, z = batch_features(model, hooks, enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                                           y_all[idx].to(dev), lab, return_logits=True)
                f0[idx] = f.float().cpu().numpy()
                feats[idx] = phi.cpu().numpy()
                logprobs[idx] = torch.log_softmax(z.float(), dim=-1).cpu().numpy()
    finally:
        model.train(was_training)
    return (f0, feats, logprobs) if return_logprobs else (f0, feats)
