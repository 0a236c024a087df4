"""Score prompts by the label words' first tokens at the answer position.

f(x; θ) = log p_y − log(1 − p_y), with p = softmax over the C label logits at the last real token.
Only the C lm_head rows are used: the full-vocab logits (49k for SmolLM2, 128k for Llama 3) are never formed.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


def encode(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded batch {input_ids, attention_mask}; too-long prompts lose tokens from the LEFT.

    The answer cue ("Sentiment:") is at the end of a prompt, so that is the part we must keep. Leading special
    tokens (a BOS the tokenizer adds) are kept too.
    """
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # what the tokenizer puts in front, if anything
    rows = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    if max_length <= len(prefix):
        raise ValueError(f"max_length={max_length} leaves no room after {len(prefix)} special tokens")
    keep = max_length - len(prefix)
    rows = [r if len(r) <= max_length else prefix + r[len(r) - keep:] for r in rows]
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder returning hidden states, lm_head) of a HF causal LM, plain or peft-wrapped."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel -> CausalLM
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    if head is None or decoder is None:
        raise TypeError(f"cannot find the decoder and lm_head of {type(base).__name__}")
    return decoder, head


def _head_rows(head: torch.nn.Module, label_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = head.weight
    if getattr(w, "quant_state", None) is not None:  # a bitsandbytes-quantised head: dequantise once
        import bitsandbytes.functional as bnbf
        w = bnbf.dequantize_4bit(w.data, w.quant_state)
    bias = head.bias[label_ids] if getattr(head, "bias", None) is not None else None
    return w[label_ids], bias


def answer_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, H) final hidden state at each example's last real token: what the label logits are read from."""
    decoder, _ = backbone_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # Right padding: the last real token is at mask.sum-1, and causal attention never let it see a pad.
    last = attention_mask.sum(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def label_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 label_ids: torch.Tensor) -> torch.Tensor:
    """(B, C) float32 logits of the label tokens at each example's last real token. Differentiable."""
    h = answer_hidden(model, input_ids, attention_mask)
    _, head = backbone_and_head(model)
    label_ids = torch.as_tensor(label_ids, device=h.device)
    w, b = _head_rows(head, label_ids)
    logits = h.float() @ w.float().T  # fp32 here: the label logits are what f is made of
    return logits + b.float() if b is not None else logits


def log_odds(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """f = log p_y − log(1 − p_y) over the C label logits = z_y − logsumexp(z_{≠y}); stable."""
    if logits.shape[-1] < 2:
        raise ValueError("log-odds need at least two labels")
    labels = torch.as_tensor(labels, device=logits.device).long()
    z_y = logits.gather(-1, labels[:, None])[:, 0]
    others = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[-1]).bool(), float("-inf"))
    return z_y - torch.logsumexp(others, dim=-1)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (longest first), so padding is small; stable for ties."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> list[int]:
    return [min(len(r), max_length) for r in tokenizer(prompts, add_special_tokens=True)["input_ids"]]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logprobs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     label_ids: list[int] | torch.Tensor, *, batch_size: int = 16, max_length: int = 256,
                     progress: bool = False) -> np.ndarray:
    """(N, C) log-softmax over the label words, in the prompts' order."""
    dev = model_device(model)
    lab = torch.as_tensor(label_ids, device=dev)
    out = np.zeros((len(prompts), len(lab)), dtype=np.float32)
    batches = length_batches(prompt_lengths(tokenizer, prompts, max_length), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="scoring", unit="batch")
    for idx in batches:
        enc = encode(tokenizer, [prompts[i] for i in idx], max_length)
        z = label_logits(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), lab)
        out[idx] = torch.log_softmax(z, dim=-1).cpu().numpy()
    return out


def accuracy(logprobs: np.ndarray, labels: np.ndarray | list[int]) -> float:
    """Share of rows whose argmax is the gold label."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    return float((np.asarray(logprobs).argmax(-1) == labels).mean())
