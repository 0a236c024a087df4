"""How good is the first-order (Taylor) approximation f(θ0+Δ) ≈ f(θ0) + gᵀΔ near the base LoRA?

We measure what the paper measures: the error of the first-order expansion itself, with the FULL per-example
gradient g (not its projection; the projection's own error is a separate, JL question). For random LoRA moves
Δ of a given relative size we compare the true f(θ0+Δ) to f0 + gᵀΔ.

Size of Δ: with a trained adapter, ‖Δ_m‖ = scale·‖θ_m‖ for every LoRA matrix m. With a fresh LoRA (B = 0,
so ‖θ_B‖ = 0 gives no yardstick) Δ goes on B only, sized so the update it makes to the layer,
‖Δ_B A‖·scaling, equals scale·‖W_base‖ for that layer.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from grouplora.ml.lora import base_weight, is_fresh, lora_scaling, lora_weights
from grouplora.ml.scoring import encode, label_logits, log_odds, model_device, token_batches

SCALES = (0.001, 0.005, 0.01, 0.02)


def per_example_gradients(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                          labels: list[int], label_ids: list[int], names: list[str],
                          max_length: int = 256) -> list[dict[str, torch.Tensor]]:
    """Full gradient of each example's f w.r.t. the LoRA matrices `names`, one autograd.grad per example."""
    dev = model_device(model)
    weights = lora_weights(model)
    params = [weights[n] for n in names]
    lab = torch.as_tensor(label_ids, device=dev)
    out = []
    with torch.enable_grad():
        for p, y in zip(prompts, labels):
            enc = encode(tokenizer, [p], max_length)
            f = log_odds(label_logits(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), lab),
                         torch.tensor([y], device=dev))
            grads = torch.autograd.grad(f.sum(), params)
            out.append({n: g.detach().double() for n, g in zip(names, grads)})
    return out


@torch.no_grad()
def f_values(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], labels: list[int],
             label_ids: list[int], batch_size: int = 8, max_length: int = 256) -> np.ndarray:
    """f (log-odds of the gold label) for every prompt, no grad."""
    dev = model_device(model)
    lab = torch.as_tensor(label_ids, device=dev)
    f = np.zeros(len(prompts))
    for idx, enc in token_batches(tokenizer, prompts, max_length, batch_size=batch_size):
        z = label_logits(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), lab)
        f[idx] = log_odds(z, torch.tensor([labels[i] for i in idx], device=dev)).double().cpu().numpy()
    return f


def random_perturbation(model: torch.nn.Module, names: list[str], scale: float, fresh: bool,
                        gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random Gaussian direction per LoRA matrix, sized as in the module docstring."""
    weights = lora_weights(model)
    delta = {}
    for n in names:
        w = weights[n]
        z = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        if fresh:  # only lora_B here: size the layer update Δ_B A · scaling against the base weight
            a = weights[n.removesuffix("lora_B") + "lora_A"].detach().double().cpu()
            target = scale * base_weight(model, n).detach().double().norm().item()
            size = (z @ a).norm().item() * lora_scaling(model, n)
        else:
            target = scale * w.detach().double().norm().item()
            size = z.norm().item()
        delta[n] = (z * (target / size)).to(w.device)
    return delta


def approximation_errors(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                         labels: list[int], label_ids: list[int], scales: tuple[float, ...] | list[float] = SCALES,
                         n_draws: int = 3, seed: int = 0, batch_size: int = 8,
                         max_length: int = 256) -> list[dict]:
    """Per scale: mean and median of |f(θ0+Δ) − f0 − gᵀΔ| / |f(θ0+Δ)| over examples x draws.

    Also reported: the error relative to the change itself, |f(θ0+Δ) − f0 − gᵀΔ| / |f(θ0+Δ) − f0|, a stricter
    yardstick (how much of the move the linear term misses), and the mean |f(θ0+Δ) − f0|."""
    fresh = is_fresh(model)
    weights = lora_weights(model)
    names = [n for n in weights if not fresh or n.endswith("lora_B")]
    was_training = model.training
    model.eval()
    try:
        f0 = f_values(model, tokenizer, prompts, labels, label_ids, batch_size, max_length)
        grads = per_example_gradients(model, tokenizer, prompts, labels, label_ids, names, max_length)
        gen = torch.Generator().manual_seed(seed)
        rows = []
        for scale in scales:
            rel, rel_change, change = [], [], []
            for _ in range(n_draws):
                delta = random_perturbation(model, names, scale, fresh, gen)
                lin = np.array([sum((g[n] * delta[n].double().to(g[n].device)).sum().item() for n in names)
                                for g in grads])
                saved = {n: weights[n].detach().clone() for n in names}
                with torch.no_grad():
                    for n in names:
                        weights[n].add_(delta[n].to(weights[n].dtype))
                try:
                    f1 = f_values(model, tokenizer, prompts, labels, label_ids, batch_size, max_length)
                finally:
                    with torch.no_grad():
                        for n in names:
                            weights[n].copy_(saved[n])
                err = np.abs(f1 - f0 - lin)
                rel.extend(err / np.abs(f1))
                rel_change.extend(err / np.maximum(np.abs(f1 - f0), 1e-12))
                change.extend(np.abs(f1 - f0))
            rows.append({"scale": scale, "mean_rel_error": float(np.mean(rel)),
                         "median_rel_error": float(np.median(rel)),
                         "median_rel_error_of_change": float(np.median(rel_change)),
                         "mean_abs_change": float(np.mean(change)), "n": len(rel)})
    finally:
        model.train(was_training)
    return rows
