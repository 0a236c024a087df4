"""LoRA adapters through peft, and a stable naming of their matrices.

Each LoRA matrix gets a canonical name such as "model.layers.0.self_attn.q_proj.lora_B": the module path with
peft's "base_model.model." prefix and the adapter name removed, so the name (and with it the projection's
per-matrix seed) is the same whether it is read off a PeftModel, its LoraModel, or after reloading an adapter.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel


def add_lora(model: PreTrainedModel, r: int = 8, alpha: int = 16,
             target_modules: tuple[str, ...] = ("q_proj", "v_proj"), dropout: float = 0.0,
             seed: int = 0) -> PeftModel:
    """A fresh LoRA (A random, B = 0) on `model`; only the LoRA weights are trainable."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                     bias="none", task_type="CAUSAL_LM")
    # peft draws A from the global RNG: seed a forked RNG so the adapter depends on `seed` alone
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):  # the caller's CPU and CUDA RNG streams come back untouched
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def load_adapter(model: PreTrainedModel, path: str | Path) -> PeftModel:
    """A saved adapter on `model`, trainable (so gradients and features can be taken at it)."""
    return PeftModel.from_pretrained(model, str(path), is_trainable=True)


@contextmanager
def applied_adapter(model: PreTrainedModel, path: str | Path | None) -> Iterator[torch.nn.Module]:
    """`model` with the saved adapter at `path` on it (None: the bare model), in eval mode. Afterwards the adapter
    is unloaded and the base gets back its requires_grad flags and mode (peft freezes the base on load)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    pm = None if path is None else PeftModel.from_pretrained(model, str(path), is_trainable=False)
    try:
        yield (model if pm is None else pm).eval()
    finally:
        if pm is not None:
            pm.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(was_training)


@contextmanager
def lora_on(model: PreTrainedModel, adapter: str | Path | None = None, **lora: object) -> Iterator[PeftModel]:
    """`model` with a fresh LoRA (add_lora(**lora)) or the saved `adapter` (trainable) for the block; then the
    LoRA layers are unloaded and every requires_grad flag and the train/eval mode restored, so a process-wide
    cached base comes back as it was without a deep copy of it (≈ 0.5 GB and seconds of CPU for SmolLM2)."""
    if isinstance(model, PeftModel) or any(n.split(".")[-1] in ("lora_A", "lora_B") for n, _ in model.named_modules()):
        raise ValueError("the base model already carries LoRA layers (a PeftModel, or adapters loaded for "
                         "prediction: call ensemble.release(model) first)")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    pm = load_adapter(model, adapter) if adapter is not None else add_lora(model, **lora)
    try:
        yield pm
    finally:
        pm.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(was_training)


def canonical_name(module_path: str, adapter: str = "default") -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_B.default' -> 'model.layers.0.self_attn.q_proj.lora_B'."""
    name = module_path.removeprefix("base_model.model.")
    return name.removesuffix("." + adapter)


def lora_modules(model: torch.nn.Module, adapter: str | None = None) -> dict[str, torch.nn.Linear]:
    """canonical name -> the nn.Linear holding that LoRA matrix (lora_A / lora_B of the active adapter)."""
    if adapter is None:
        adapter = getattr(model, "active_adapter", "default")
        adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
    out: dict[str, torch.nn.Linear] = {}
    for path, mod in model.named_modules():
        parts = path.split(".")
        if len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B") and parts[-1] == adapter:
            out[canonical_name(path, adapter)] = mod
    if not out:
        raise ValueError("the model has no LoRA modules (wrap it with add_lora or load_adapter first)")
    return out


def lora_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """canonical name -> LoRA weight (shape out x in, as nn.Linear stores it)."""
    return {n: m.weight for n, m in lora_modules(model).items()}


def is_fresh(model: torch.nn.Module) -> bool:
    """True when every lora_B is zero: then f does not depend on A to first order (dL/dA = Bᵀ... = 0)."""
    return all(bool((w == 0).all()) for n, w in lora_weights(model).items() if n.endswith("lora_B"))


def lora_parent(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The peft LoRA layer (e.g. q_proj) that owns the matrix `name`."""
    path = name.rsplit(".", 1)[0]  # drop lora_A / lora_B
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_submodule(path)


def base_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The frozen base weight W (out x in) next to LoRA matrix `name`, dequantised if 4-bit."""
    w = lora_parent(model, name).get_base_layer().weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(w.data, w.quant_state)
    return w


def lora_scaling(model: torch.nn.Module, name: str, adapter: str = "default") -> float:
    return float(lora_parent(model, name).scaling[adapter])
