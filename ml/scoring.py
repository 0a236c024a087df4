"""Score prompts by the label words' first tokens at the answer position.

f(x; θ) = log p_y − log(1 − p_y), with p = softmax over the C label logits at the last real token.
Only the C lm_head rows are used: the full-vocab logits (49k for SmolLM2, 128k for Llama 3) are never formed.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's special tokens); too-long prompts lose tokens from the LEFT.

    The answer cue ("Sentiment:") is at the end of a prompt, so that is the part we must keep. Leading special
    tokens (a BOS the tokenizer adds) are kept too.
    """
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # what the tokenizer puts in front, if anything
    if max_length <= len(prefix):
        raise ValueError(f"max_length={max_length} leaves no room after {len(prefix)} special tokens")
    rows = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    keep = max_length - len(prefix)
    return [r if len(r) <= max_length else prefix + r[len(r) - keep:] for r in rows]


def pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch {input_ids, attention_mask} of token-id rows, whatever the tokenizer's padding_side:
    the last real token is then at attention_mask.sum(1) - 1 and, under causal attention, never sees a pad."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def encode(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded batch {input_ids, attention_mask}; too-long prompts lose tokens from the LEFT (tokenize)."""
    return pad(tokenize(tokenizer, prompts, max_length), tokenizer.pad_token_id)


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


def length_batches(lengths: list[int], batch_size: int | None = None, *,
                   max_tokens: int | None = None) -> list[list[int]]:
    """Indices in batches of similar length, longest first (a batch that does not fit shows at once), so
    padding is small; stable for ties.

    batch_size caps the examples per batch; max_tokens caps the padded tokens per batch (examples x the
    batch's longest length): short examples then share a batch by the dozen, long ones go a few at a time.
    An example longer than max_tokens gets a batch of its own."""
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size, max_tokens or both")
    if (batch_size is not None and batch_size < 1) or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"batch_size {batch_size} and max_tokens {max_tokens} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        # sorted longest first: a batch's padded length is the length of its first example
        if (b is None or (batch_size is not None and len(b) >= batch_size)
                or (max_tokens is not None and (len(b) + 1) * max(1, lengths[b[0]]) > max_tokens)):
            batches.append([i])
        else:
            b.append(i)
    return batches


# Padded tokens per batch by device. CPU: benchmarks/demo_ml.py (budgets) found 512 as cheap as the old fixed
# batches and 2048 10-20% dearer (bigger activations miss the caches); the forward + backward of 1024 tokens
# holds ~1.2 GB of activations for SmolLM2. CUDA: a GPU needs big batches to be busy; 16384 tokens (~250 demo
# prompts) until benchmarks/gradient_features.py --pipeline's H200 sweep says better.
MAX_TOKENS = {"cpu": 512, "cuda": 16384}


def default_max_tokens(device: str | torch.device) -> int:
    """The token budget for batches on `device` (cpu, cuda, cuda:N)."""
    return MAX_TOKENS.get(torch.device(device).type, MAX_TOKENS["cpu"])


def batching(device: str | torch.device, batch_size: int | None = None, max_tokens: int | None = None
             ) -> dict[str, int | None]:
    """{batch_size, max_tokens} for length_batches: at most max_tokens padded tokens per batch (0 or None = the
    device's budget, default_max_tokens) and at most batch_size examples (0 or None = no cap)."""
    return {"batch_size": batch_size or None, "max_tokens": max_tokens or default_max_tokens(device)}


def shuffled_length_batches(lengths: list[int], batch_size: int, seed: int | list[int], *,
                            window: int = 8) -> list[list[int]]:
    """One training epoch's batches of `batch_size` examples with little padding and still random: a seeded
    permutation cut into windows of window * batch_size examples, each window sorted by length and cut into
    batches, then the batches shuffled. Same example count per batch and per epoch as plain shuffling
    (one short batch at most, ceil(N / batch_size) batches); window = 1 is plain shuffling."""
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size {batch_size} and window {window} must be >= 1")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    span = window * batch_size
    batches = []
    for w in range(0, len(perm), span):
        chunk = sorted(perm[w: w + span].tolist(), key=lambda i: -lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]  # at most one: the last window's remainder
    return [full[i] for i in rng.permutation(len(full))] + short


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> list[int]:
    return [len(r) for r in tokenize(tokenizer, prompts, max_length)]


def token_batches(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, *,
                  batch_size: int | None = None, max_tokens: int | None = None
                  ) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """[(indices, right-padded encoding)] over length_batches: every prompt tokenized once, batched by
    similar length up to batch_size examples and/or max_tokens padded tokens."""
    rows = tokenize(tokenizer, prompts, max_length)
    return [(idx, pad([rows[i] for i in idx], tokenizer.pad_token_id))
            for idx in length_batches([len(r) for r in rows], batch_size, max_tokens=max_tokens)]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logprobs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     label_ids: list[int] | torch.Tensor, *, batch_size: int | None = 16, max_length: int = 256,
                     max_tokens: int | None = None, progress: bool = False) -> np.ndarray:
    """(N, C) log-softmax over the label words, in the prompts' order. Batches: length_batches (batch_size
    examples and/or max_tokens padded tokens at most); the result does not depend on them (up to float error)."""
    dev = model_device(model)
    lab = torch.as_tensor(label_ids, device=dev)
    out = np.zeros((len(prompts), len(lab)), dtype=np.float32)
    batches = token_batches(tokenizer, prompts, max_length, batch_size=batch_size, max_tokens=max_tokens)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="scoring", unit="batch")
    for idx, enc in batches:
        z = label_logits(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), lab)
        out[idx] = torch.log_softmax(z, dim=-1).cpu().numpy()
    return out


def accuracy(logprobs: np.ndarray, labels: np.ndarray | list[int]) -> float:
    """Share of rows whose argmax is the gold label."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    return float((np.asarray(logprobs).argmax(-1) == labels).mean())
