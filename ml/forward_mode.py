"""The estimator's `forward` mode: load θ0 + P w into the LoRA weights and run the real model.

The linearized estimate scores f0 + gᵀw; this runs f(θ0 + Pw) itself, so the two can be compared on the same
w. It is slower (a forward pass per example) and exists to verify the estimates, not to replace them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from grouplora.ml.lora import lora_weights
from grouplora.ml.projection import Projection
from grouplora.ml.scoring import log_odds, predict_logprobs


@contextmanager
def shifted_lora(model: torch.nn.Module, projection: Projection, w: np.ndarray) -> Iterator[torch.nn.Module]:
    """Within the block the model's LoRA weights are θ0 + P w; they are restored exactly afterwards."""
    weights = lora_weights(model)
    delta = projection.unproject(torch.as_tensor(np.asarray(w), dtype=torch.float32))
    saved = {n: weights[n].detach().clone() for n in delta}
    try:
        with torch.no_grad():
            for n, dlt in delta.items():
                weights[n].add_(dlt.to(device=weights[n].device, dtype=weights[n].dtype))
        yield model
    finally:
        with torch.no_grad():
            for n, old in saved.items():
                weights[n].copy_(old)


def log_odds_from_logprobs(logprobs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """f = log p_y − log(1 − p_y) from label log-probabilities (N, C): scoring.log_odds, on numpy arrays."""
    return log_odds(torch.as_tensor(logprobs, dtype=torch.float64), torch.as_tensor(labels)).numpy()


def forward_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, projection: Projection,
                   w: np.ndarray, prompts: list[str], labels: list[int], label_ids: list[int], *,
                   batch_size: int = 16, max_length: int = 256) -> dict[str, float]:
    """Validation loss mean log(1 + exp(−f)), accuracy mean(f > 0) and margin mean(f) of the real model at θ0 + Pw."""
    y = np.asarray(labels)
    with shifted_lora(model, projection, w):
        logprobs = predict_logprobs(model, tokenizer, prompts, label_ids, batch_size=batch_size, max_length=max_length)
    f = log_odds_from_logprobs(logprobs, y)
    return {"est_loss": float(np.logaddexp(0.0, -f).mean()), "est_accuracy": float((f > 0).mean()),
            "est_margin": float(f.mean()), "n_val": len(f)}
