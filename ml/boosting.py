"""Boosting rounds for groups whose error stays high.

Cheap boosting (no training), the GradEx first-order view: around θ0 the per-example margins are
f(θ0 + Pw) ≈ f0 + G w, with G (N, d) the projected gradients. Fit w by ridge regression of the residuals
r (what the margins should move by; e.g. the negative logistic-loss gradient σ(−m) at the ensemble's
current margins m), then write θ0 + Pw as a peft adapter.

Trained boosting: train_adapter on the group's examples with sample weights ∝ their current loss.

A round is kept only if the ensemble's validation loss improves (keep_round).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import scipy.linalg
import torch

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


def loss_weights(per_example_loss: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Sample weights ∝ current per-example loss (+ floor), scaled to mean 1."""
    l = np.clip(np.asarray(per_example_loss, dtype=np.float64), 0.0, None) + floor
    if l.size == 0 or not np.all(np.isfinite(l)) or l.sum() <= 0:
        raise ValueError("per-example losses must be finite with a positive sum")
    return l / l.mean()


def train_boost_adapter(base_name_or_model: Any, examples: Sequence, current_loss: np.ndarray, config,
                        out_dir: Path, **kwargs):
    """train_adapter on a group's examples reweighted by their current (ensemble) loss."""
    from grouplora.ml.training import train_adapter
    return train_adapter(base_name_or_model, examples, config, out_dir,
                         sample_weights=loss_weights(current_loss), **kwargs)


def keep_round(val_loss_before: float, val_loss_after: float, min_gain: float = 0.0) -> bool:
    """Keep a boosting round only if validation loss drops by more than min_gain (NaN after = reject)."""
    if not np.isfinite(val_loss_after):
        return False
    return bool(val_loss_before - val_loss_after > min_gain)
