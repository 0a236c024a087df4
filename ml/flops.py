"""Training-FLOP estimates (the Kaplan et al. 6·N·T rule and its LoRA variant).

Notation: N = parameters of the base model's matmuls (every nn.Linear except lm_head; embeddings are
lookups, not matmuls), N_lora = trainable LoRA parameters, T = tokens processed (real, non-pad tokens).

* Forward: 2·N·T (one multiply and one add per weight per token).
* Full fine-tuning: 6·N·T = forward 2NT + backward 4NT (gradients w.r.t. activations 2NT and w.r.t.
  weights 2NT).
* LoRA: the base is frozen, so its weight gradients (2NT) are never computed, but the activation
  gradients still flow through every base layer (2NT). The adapters themselves cost the full 6·N_lora·T:
      LoRA training FLOPs = 2·N·T + 2·N·T + 6·N_lora·T = 4·N·T + 6·N_lora·T.
Attention-score FLOPs (∝ T·context) and the C-row label head are left out, as in the 6NT rule;
QLoRA counts the same (dequantisation is memory traffic, not matmul FLOPs).
"""

from __future__ import annotations

import torch


def forward_flops(n_params: int, tokens: int) -> int:
    """2·N·T."""
    return 2 * n_params * tokens


def full_training_flops(n_params: int, tokens: int) -> int:
    """6·N·T: forward 2NT + activation gradients 2NT + weight gradients 2NT."""
    return 6 * n_params * tokens


def lora_training_flops(n_base: int, n_lora: int, tokens: int) -> int:
    """4·N_base·T + 6·N_lora·T: frozen base forward + activation backward, adapters trained in full."""
    return 4 * n_base * tokens + 6 * n_lora * tokens


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(N_base, N_lora) of a (peft-wrapped) model: base Linear weights except lm_head, and LoRA weights.

    Counted from in_features·out_features, not param.numel(), so 4-bit (packed) weights count in full.
    """
    n_base = n_lora = 0
    for name, mod in model.named_modules():
        parts = name.split(".")
        if not isinstance(mod, torch.nn.Linear) or parts[-1] == "lm_head":
            continue
        # peft keeps each adapter's factors as nn.Linear children named ...q_proj.lora_A.<adapter>.
        if "lora_A" in parts or "lora_B" in parts:
            n_lora += mod.in_features * mod.out_features
        else:
            n_base += mod.in_features * mod.out_features
    return n_base, n_lora
