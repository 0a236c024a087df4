"""Train one LoRA (or QLoRA) adapter on a mixture of prompted classification datasets.

Each example carries its own dataset's label-word token ids, so one batch can mix datasets with different
label sets and class counts: we score the batch once against the union of its label ids and gather each
row's own classes (padded with -inf), then take the cross-entropy over those classes only.

Resumable: the end of every epoch writes out_dir/checkpoints/epoch_<k>/ atomically (adapter weights,
optimizer, scheduler, RNG, counters). Calling again with the same config and data resumes from the latest
one; a finished run (out_dir/train_result.json) returns at once.

Best-validation checkpoint: with `val_examples`, every epoch ends with the mean cross-entropy on them and the
adapter saved in out_dir is the epoch with the lowest one (TrainResult.best_epoch). Pass held-out examples that
nothing reported is measured on (e.g. the selection fold of validation, `ml.folds`). That epoch's label log-probs
on them are kept beside the adapter (`validation_logprobs`): whoever needs the adapter's scores on the same
examples (boosting's held-out loss) reads them instead of scoring again.

Logit offsets (`logit_offsets`, per example): added to the example's label logits before the loss, so the
adapter learns what to ADD to a fixed prediction (boosting fits the residual of the current ensemble).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grouplora.ml.atomic import atomic_dir, atomic_files, atomic_path, write_json
from grouplora.ml.flops import forward_flops, lora_training_flops, matmul_params
from grouplora.ml.lora import add_lora
from grouplora.ml.model import load_base_model, model_fingerprint
from grouplora.ml.scoring import encode, label_logits, length_batches, prompt_lengths, shuffled_length_batches

RESULT_JSON = "train_result.json"
VAL_LOGPROBS = "val_logprobs.npz"  # the saved epoch's label log-probs on val_examples (validation_logprobs)
STATE_FILE = "trainer_state.pt"
CKPT_JSON = "checkpoint.json"


class TrainExample(NamedTuple):
    prompt: str
    label_index: int
    label_ids: Sequence[int]  # first tokens of this example's dataset's label words, in class order


@dataclass(frozen=True)
class TrainConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # The defaults are the pipeline's (orchestration/settings.py:TrainingSettings reads them from here).
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 8
    max_length: int = 160
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    seed: int = 0
    grad_clip: float = 1.0  # 0 = no clipping
    qlora: bool = False
    max_steps: int | None = None
    lr_schedule: str = "linear"  # linear | cosine | constant (after warmup)
    length_window: int = 8  # batches drawn by length within windows of this many batches (less padding); 1 = plain shuffling

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: use linear, cosine or constant")


@dataclass
class TrainResult:
    final_loss: float  # mean (weighted) training loss of the last epoch
    epoch_losses: list[float]
    steps: int
    seconds: float  # wall time summed over every (resumed) call that trained
    flops: int  # flops.lora_training_flops(N_base, N_lora, tokens)
    peak_memory_bytes: int  # CUDA: max_memory_allocated; CPU: peak RSS growth of this call
    tokens: int  # real (non-pad) tokens processed
    n_base_params: int
    n_lora_params: int
    resumed_from_epoch: int  # 0 = started fresh
    out_dir: str = ""
    epochs: int = 0  # epochs trained (a max_steps stop counts its partial epoch)
    best_epoch: int = 0  # 1-based epoch whose weights were saved (the last one without val_examples)
    val_losses: list[float] = dataclasses.field(default_factory=list)  # mean val CE after each epoch
    eval_flops: int = 0  # forward FLOPs of the per-epoch validation passes (not training FLOPs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loss


def batch_loss(model: torch.nn.Module, tokenizer, batch: Sequence[TrainExample], max_length: int,
               weights: torch.Tensor | None = None, offsets: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weighted mean CE, per-example label logits (B, C_max) with -inf padding, real tokens).
    offsets (B, >= C_max): added to the logits first (the returned logits include them)."""
    device = _device_of(model)
    enc = encode(tokenizer, [e.prompt for e in batch], max_length)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    logits = example_logits(model, ids, mask, [e.label_ids for e in batch])
    if offsets is not None:
        logits = logits + offsets[:, :logits.shape[1]].to(device)
    target = torch.tensor([e.label_index for e in batch], device=device)
    ce = F.cross_entropy(logits, target, reduction="none")
    loss = ce.mean() if weights is None else (ce * weights.to(device)).mean()
    return loss, logits, int(mask.sum())


def example_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   label_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, C_max) float32 label logits, row i over its own label_ids[i], -inf beyond its class count."""
    union = sorted({t for ids in label_ids for t in ids})
    col = {t: j for j, t in enumerate(union)}
    c_max = max(len(ids) for ids in label_ids)
    index = torch.tensor([[col[t] for t in ids] + [0] * (c_max - len(ids)) for ids in label_ids])
    valid = torch.tensor([[True] * len(ids) + [False] * (c_max - len(ids)) for ids in label_ids])
    device = input_ids.device
    u = label_logits(model, input_ids, attention_mask, torch.tensor(union, device=device)).float()
    return u.gather(1, index.to(device)).masked_fill(~valid.to(device), float("-inf"))


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, examples: Sequence[TrainExample], *, batch_size: int | None = 16,
             max_length: int = 256, max_tokens: int | None = None,
             logit_offsets: Sequence[Sequence[float]] | np.ndarray | None = None, return_logprobs: bool = False
             ) -> tuple[np.ndarray, ...]:
    """Per-example (cross-entropy, correct) of `model` (base or peft-wrapped) on examples, in order; batched
    by length (scoring.length_batches: batch_size examples and/or max_tokens padded tokens); logit_offsets: per
    example, added to its label logits as in training. return_logprobs: also the (N, C_max) label log-softmax
    (offsets included; -inf beyond an example's class count)."""
    examples = [_as_example(e) for e in examples]
    offsets = _offsets(logit_offsets, examples)
    was_training = model.training
    model.eval()
    losses, correct = np.zeros(len(examples), dtype=np.float32), np.zeros(len(examples), dtype=bool)
    logprobs = (np.full((len(examples), max((len(e.label_ids) for e in examples), default=0)), -np.inf,
                        dtype=np.float32) if return_logprobs else None)
    lengths = prompt_lengths(tokenizer, [e.prompt for e in examples], max_length)
    try:
        for idx in length_batches(lengths, batch_size, max_tokens=max_tokens):
            batch = [examples[i] for i in idx]
            _, logits, _ = batch_loss(model, tokenizer, batch, max_length,
                                      offsets=None if offsets is None else offsets[idx])
            target = torch.tensor([e.label_index for e in batch], device=logits.device)
            losses[idx] = F.cross_entropy(logits, target, reduction="none").cpu().numpy()
            correct[idx] = (logits.argmax(1) == target).cpu().numpy()
            if return_logprobs:
                logprobs[idx, :logits.shape[1]] = torch.log_softmax(logits, dim=-1).cpu().numpy()
    finally:
        model.train(was_training)
    return (losses, correct, logprobs) if return_logprobs else (losses, correct)


# ------------------------------------------------------------------------------------------- training


def train_adapter(
    base_name_or_model: Any,
    examples: Sequence[TrainExample],
    config: TrainConfig,
    out_dir: Path,
    *,
    tokenizer=None,
    sample_weights: Sequence[float] | np.ndarray | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    init_adapter: str | Path | None = None,
    val_examples: Sequence[TrainExample] | None = None,
    logit_offsets: Sequence[Sequence[float]] | np.ndarray | None = None,
    val_logit_offsets: Sequence[Sequence[float]] | np.ndarray | None = None,
    eval_batch_size: int = 32,
) -> TrainResult:
    """Train a fresh LoRA adapter on `examples`; out_dir gets the adapter in peft's save_pretrained format.

    base_name_or_model: a name/path for load_base_model (4-bit when config.qlora), a loaded model (pass
    `tokenizer=`), or a (model, tokenizer) pair. A passed model is left as it came: the LoRA layers are
    unloaded and requires_grad/train mode restored, so several adapters can be trained on one base.
    sample_weights: per-example loss weights (e.g. boosting), rescaled to mean 1.
    on_step(step, metrics): called after every optimizer step (loss, lr, grad_norm, epoch, tokens) and
    after every epoch (epoch_loss, epoch).
    init_adapter: start from this saved adapter (same r, targets; e.g. a meta-initialization) instead of a
    fresh LoRA (A seeded, B = 0).
    val_examples: held-out examples scored after every epoch; the saved adapter is the epoch with the lowest
    mean cross-entropy on them (TrainResult.best_epoch, val_losses). None: the last epoch.
    logit_offsets / val_logit_offsets: per example, added to its label logits before the loss (boosting).
    """
    out_dir = Path(out_dir)
    examples = [_as_example(e) for e in examples]
    _check_examples(examples)
    weights = _normalized_weights(sample_weights, len(examples))
    offsets = _offsets(logit_offsets, examples)
    val = None
    if val_examples is not None:
        val = [_as_example(e) for e in val_examples]
        _check_examples(val)
    val_offsets = _offsets(val_logit_offsets, val) if val is not None else None
    if val_logit_offsets is not None and val is None:
        raise ValueError("val_logit_offsets without val_examples")
    model, tokenizer = _resolve_base(base_name_or_model, tokenizer, config, device, dtype)
    _check_clean(model)

    init_state = _init_state(init_adapter, config)
    key = run_key(config, model_fingerprint(model), examples, weights, init_state,
                  extra=[offsets, val, val_offsets])
    done = _finished_result(out_dir, key, config)
    if done is not None:
        return done

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    with _own_rng(model):  # the caller's CPU and CUDA RNG come back untouched
        peft_model = add_lora(model, r=config.r, alpha=config.alpha, target_modules=config.target_modules,
                              dropout=config.dropout, seed=config.seed)
        try:
            if init_state is not None:
                _load_init(peft_model, init_state, init_adapter)
            return _train(peft_model, tokenizer, examples, weights, config, out_dir, key, on_step, progress,
                          offsets=offsets, val=val, val_offsets=val_offsets, eval_batch_size=eval_batch_size)
        finally:
            # Hand the base back untouched: no LoRA layers, original grad flags and mode.
            peft_model.unload()
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
            model.train(was_training)


def _train(peft_model, tokenizer, examples, weights, config: TrainConfig, out_dir: Path, key: str,
           on_step, progress: bool, *, offsets: torch.Tensor | None = None, val: list[TrainExample] | None = None,
           val_offsets: torch.Tensor | None = None, eval_batch_size: int = 32) -> TrainResult:
    device = _device_of(peft_model)
    n = len(examples)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    lr_fn = lr_lambda(config.lr_schedule, total, round(config.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    n_base, n_lora = matmul_params(peft_model)
    st = {"epoch": 0, "step": 0, "tokens": 0, "seconds": 0.0, "epoch_losses": [], "val_losses": [],
          "val_tokens": 0}
    lengths = prompt_lengths(tokenizer, [e.prompt for e in examples], config.max_length)
    val_lp: dict[int, np.ndarray] = {}  # epoch -> label log-probs on val (this process's epochs only)

    with _PeakMemory(device) as mem:
        torch.manual_seed(config.seed)  # dropout; inside train_adapter's _own_rng
        ckpt = latest_checkpoint(out_dir, max_epoch=config.epochs)
        if ckpt is not None:
            st = _load_checkpoint(ckpt, key, peft_model, opt, sched, device)
            # The schedule may have a new length (more epochs): continue on the new curve.
            for g in opt.param_groups:
                g["lr"] = config.lr * lr_fn(sched.last_epoch)
        resumed_from = st["epoch"]
        peft_model.train()
        bar = _progress(progress, total, st["step"])
        t0 = time.time()
        for epoch in range(st["epoch"], config.epochs):
            if st["step"] >= total:
                break
            # batch_size examples per step, grouped by length (little padding), seeded: same order on resume
            batches = shuffled_length_batches(lengths, config.batch_size, [config.seed, epoch],
                                              window=config.length_window)
            losses = []
            for b in range(steps_per_epoch):
                if st["step"] >= total:  # max_steps: stop mid-epoch
                    break
                idx = batches[b]
                loss, _, tokens = batch_loss(peft_model, tokenizer, [examples[i] for i in idx],
                                             config.max_length, None if weights is None else weights[idx],
                                             None if offsets is None else offsets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0
                                                       else float("inf"))
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                st["step"] += 1
                st["tokens"] += tokens
                losses.append(loss.item())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if on_step is not None:
                    on_step(st["step"], {"loss": losses[-1], "lr": lr, "grad_norm": float(gnorm),
                                         "epoch": epoch, "tokens": st["tokens"]})
            st["epoch_losses"].append(float(np.mean(losses)))
            if val is not None:  # before the checkpoint, so a resumed run knows every epoch's val loss
                vl, _, val_lp[epoch + 1] = evaluate(peft_model, tokenizer, val, batch_size=eval_batch_size,
                                                    max_length=config.max_length, logit_offsets=val_offsets,
                                                    return_logprobs=True)
                st["val_losses"].append(float(vl.mean()))
                st["val_tokens"] += _tokens(tokenizer, val, config.max_length)
                peft_model.train()
            if len(losses) == steps_per_epoch:  # a full epoch: checkpoint it (a max_steps stop just ends)
                st["epoch"] = epoch + 1
                st["seconds"] += time.time() - t0
                t0 = time.time()
                _save_checkpoint(out_dir, peft_model, opt, sched, st, key)
            if on_step is not None:
                on_step(st["step"], {"epoch_loss": st["epoch_losses"][-1], "epoch": epoch})
        st["seconds"] += time.time() - t0
        if bar is not None:
            bar.close()
    peak = mem.peak

    epochs_run = len(st["epoch_losses"])
    best = epochs_run
    if val is not None and st["val_losses"]:
        best = int(np.argmin(st["val_losses"])) + 1  # first of equal losses: the earlier, cheaper epoch
        if best < epochs_run:  # an earlier epoch won: its checkpoint holds its weights
            _load_adapter_files(peft_model, Path(out_dir) / "checkpoints" / f"epoch_{best}")
    _save_final(peft_model, out_dir)
    # offsets shift the logits: those scores are not the adapter's own
    _write_val_logprobs(out_dir, val, val_lp.get(best) if val_offsets is None else None)
    result = TrainResult(
        final_loss=st["epoch_losses"][-1] if st["epoch_losses"] else float("nan"),
        epoch_losses=list(st["epoch_losses"]), steps=st["step"], seconds=st["seconds"],
        flops=lora_training_flops(n_base, n_lora, st["tokens"]), peak_memory_bytes=peak,
        tokens=st["tokens"], n_base_params=n_base, n_lora_params=n_lora, resumed_from_epoch=resumed_from,
        out_dir=str(out_dir), epochs=epochs_run, best_epoch=best, val_losses=list(st["val_losses"]),
        eval_flops=forward_flops(n_base + n_lora, st["val_tokens"]))
    write_json({"key": key, "epochs": config.epochs, "max_steps": config.max_steps, "config": dataclasses.asdict(config),
                "result": result.to_dict()}, out_dir / RESULT_JSON)
    return result


def lr_lambda(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """LR multiplier for optimizer step s (0-based): linear warmup from 1/W to 1, then decay or flat."""
    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = (s - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
        return max(0.0, 1.0 - frac)
    return fn


def save_fresh_adapter(base_name_or_model: Any, config: TrainConfig, out_dir: Path, *, tokenizer=None) -> Path:
    """Write the untrained LoRA init θ0 (A seeded, B = 0) that train_adapter(config) starts from."""
    model, _ = _resolve_base(base_name_or_model, tokenizer, config, None, None)
    _check_clean(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with _own_rng(model):
        peft_model = add_lora(model, r=config.r, alpha=config.alpha, target_modules=config.target_modules,
                              dropout=config.dropout, seed=config.seed)
    try:
        _save_final(peft_model, Path(out_dir))
    finally:
        peft_model.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
    return Path(out_dir)


# ----------------------------------------------------------------------------------------- checkpoints


def run_key(config: TrainConfig, base_fingerprint: str, examples: Sequence[TrainExample],
            weights: np.ndarray | None, init_state: dict[str, torch.Tensor] | None = None,
            extra: Sequence[Any] = ()) -> str:
    """What a checkpoint must match to be resumed: everything but the run length (epochs, max_steps).
    extra: more inputs of the run (offsets, validation examples); None entries add nothing, so a run
    without them keeps the key it had before they existed."""
    h = hashlib.sha256()
    for k in sorted(init_state or {}):  # a warm start is part of the run's identity
        h.update(k.encode())
        h.update(init_state[k].float().cpu().numpy().tobytes())
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("epochs", "max_steps")}
    h.update(json.dumps(cfg, sort_keys=True, default=list).encode())
    h.update(base_fingerprint.encode())
    for e in examples:
        h.update(json.dumps([e.prompt, e.label_index, list(e.label_ids)]).encode())
    if weights is not None:
        h.update(np.ascontiguousarray(weights, dtype=np.float64).tobytes())
    for i, x in enumerate(extra):
        if x is None:
            continue
        h.update(f"extra{i}".encode())
        if isinstance(x, torch.Tensor):
            h.update(np.ascontiguousarray(x.cpu().numpy(), dtype=np.float64).tobytes())
        else:
            for e in x:
                h.update(json.dumps([e.prompt, e.label_index, list(e.label_ids)]).encode())
    return h.hexdigest()[:24]


def latest_checkpoint(out_dir: Path, max_epoch: int | None = None) -> Path | None:
    """The highest complete out_dir/checkpoints/epoch_<k>/ (complete = renamed into place), k <= max_epoch."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch_") and p.name[6:].isdigit()
            and (max_epoch is None or int(p.name[6:]) <= max_epoch) and (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name[6:]), default=None)


def _save_checkpoint(out_dir: Path, peft_model, opt, sched, st: dict, key: str) -> Path:
    path = Path(out_dir) / "checkpoints" / f"epoch_{st['epoch']}"
    with atomic_dir(path) as tmp:
        _save_adapter_files(peft_model, tmp)
        rng = {"torch": torch.get_rng_state()}  # dropout is the only randomness in a step
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng,
                    "state": st}, tmp / STATE_FILE)
        write_json({"key": key, "epoch": st["epoch"], "step": st["step"]}, tmp / CKPT_JSON)
    return path


def _save_adapter_files(peft_model, folder: Path) -> None:
    """adapter_model.safetensors + adapter_config.json as save_pretrained writes them, minus its model card."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(state, Path(folder) / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_model.peft_config[peft_model.active_adapter].save_pretrained(str(folder))


def _load_adapter_files(peft_model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    set_peft_model_state_dict(peft_model, load_file(Path(folder) / "adapter_model.safetensors",
                                                    device=str(_device_of(peft_model))))


def _load_checkpoint(path: Path, key: str, peft_model, opt, sched, device: torch.device) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    meta = json.loads((path / CKPT_JSON).read_text())
    if meta["key"] != key:
        raise ValueError(f"{path} belongs to a run with another config, base model or data "
                         f"(key {meta['key']} != {key}); use a fresh out_dir or delete it")
    set_peft_model_state_dict(peft_model, load_file(path / "adapter_model.safetensors", device=str(device)))
    blob = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    opt.load_state_dict(blob["optimizer"])  # moves state to the params' device
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    st = blob["state"]
    st["epoch_losses"] = list(st["epoch_losses"])
    st["val_losses"] = list(st.get("val_losses", []))
    st.setdefault("val_tokens", 0)
    return st


def _save_final(peft_model, out_dir: Path) -> None:
    """save_pretrained into a temp folder, then move each file over out_dir's (readers never see half)."""
    with atomic_files(out_dir) as tmp:
        peft_model.save_pretrained(tmp)


def examples_digest(examples: Sequence[TrainExample]) -> str:
    """What identifies a list of examples for a forward: prompts and label ids, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, [int(t) for t in e.label_ids]]).encode())
    return h.hexdigest()[:16]


def _write_val_logprobs(out_dir: Path, val: list[TrainExample] | None, logprobs: np.ndarray | None) -> None:
    path = Path(out_dir) / VAL_LOGPROBS
    if val is None or logprobs is None:  # e.g. resumed after the saved epoch: its scores are not in memory
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, logprobs=logprobs, digest=np.array(examples_digest(val)))


def validation_logprobs(out_dir: Path, examples: Sequence[TrainExample]) -> np.ndarray | None:
    """(N, C_max) label log-probs of the adapter saved in out_dir on `examples`, when they are exactly the
    val_examples it was trained with (its best epoch's evaluation computed them; -inf beyond an example's class
    count); None when they are not, or were not kept."""
    path = Path(out_dir) / VAL_LOGPROBS
    if not path.exists():
        return None
    with np.load(path) as f:
        if str(f["digest"]) != examples_digest([_as_example(e) for e in examples]):
            return None
        return f["logprobs"]


def _finished_result(out_dir: Path, key: str, config: TrainConfig) -> TrainResult | None:
    p = out_dir / RESULT_JSON
    if not p.exists() or not (out_dir / "adapter_model.safetensors").exists():
        return None
    d = json.loads(p.read_text())
    if d.get("key") != key or d.get("epochs") != config.epochs or d.get("max_steps") != config.max_steps:
        return None
    return TrainResult(**d["result"])


# ----------------------------------------------------------------------------------------------- misc


def _resolve_base(base, tokenizer, config: TrainConfig, device, dtype):
    if isinstance(base, (str, Path)):
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return load_base_model(str(base), dtype=dtype or torch.float32, device=dev, load_in_4bit=config.qlora)
    if isinstance(base, tuple):
        base, tokenizer = base
    if tokenizer is None:
        raise ValueError("pass tokenizer= (or a (model, tokenizer) pair) with a loaded model")
    if is_4bit(base) != config.qlora:
        raise ValueError(f"config.qlora={config.qlora} but the passed model is "
                         f"{'' if is_4bit(base) else 'not '}4-bit")
    return base, tokenizer


def is_4bit(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def _init_state(path: str | Path | None, config: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The LoRA weights of a saved adapter to start from, checked against the config's r and targets."""
    if path is None:
        return None
    from safetensors.torch import load_file
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise FileNotFoundError(f"init_adapter {path}: need adapter_config.json and adapter_model.safetensors")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("r") != config.r or sorted(cfg.get("target_modules") or []) != sorted(config.target_modules):
        raise ValueError(f"init_adapter {path}: r={cfg.get('r')}, targets {cfg.get('target_modules')} do not "
                         f"match the training config (r={config.r}, targets {list(config.target_modules)})")
    return load_file(weights)


def _load_init(peft_model, state: dict[str, torch.Tensor], path) -> None:
    from peft import set_peft_model_state_dict
    device = _device_of(peft_model)
    result = set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in state.items()})
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"init_adapter {path} lacks LoRA weights the model has: {missing[:3]}")


def _check_clean(model: torch.nn.Module) -> None:
    from peft import PeftModel
    if isinstance(model, PeftModel) or any("lora_A" in n.split(".") for n, _ in model.named_modules()):
        raise ValueError("the base model already carries LoRA layers (a PeftModel, or adapters loaded for "
                         "prediction: call ensemble.release(model) first)")


def _as_example(e) -> TrainExample:
    if not isinstance(e, tuple):  # any object with the three fields
        e = (e.prompt, e.label_index, e.label_ids)
    return TrainExample(str(e[0]), int(e[1]), tuple(int(t) for t in e[2]))


def _check_examples(examples: Sequence[TrainExample]) -> None:
    if not examples:
        raise ValueError("no training examples")
    for i, e in enumerate(examples):
        if len(set(e.label_ids)) != len(e.label_ids) or len(e.label_ids) < 2:
            raise ValueError(f"example {i}: label_ids {list(e.label_ids)} need >= 2 distinct tokens")
        if not 0 <= e.label_index < len(e.label_ids):
            raise ValueError(f"example {i}: label_index {e.label_index} outside {len(e.label_ids)} classes")


def _offsets(offsets, examples: Sequence[TrainExample]) -> torch.Tensor | None:
    """Per-example logit offsets as an (N, C_max) float32 tensor (zeros beyond an example's classes)."""
    if offsets is None:
        return None
    if len(offsets) != len(examples):
        raise ValueError(f"logit offsets: {len(offsets)} rows for {len(examples)} examples")
    c_max = max(len(e.label_ids) for e in examples)
    out = np.zeros((len(examples), c_max), dtype=np.float32)
    for i, (o, e) in enumerate(zip(offsets, examples)):
        o = np.asarray(o, dtype=np.float64).reshape(-1)
        if o.shape[0] < len(e.label_ids) or not np.all(np.isfinite(o[:len(e.label_ids)])):
            raise ValueError(f"logit offsets row {i}: need {len(e.label_ids)} finite values, got {o.tolist()}")
        out[i, :len(e.label_ids)] = o[:len(e.label_ids)]
    return torch.from_numpy(out)


def _tokens(tokenizer, examples: Sequence[TrainExample], max_length: int) -> int:
    """Real (non-pad) tokens of the examples' prompts, as encode() would feed them."""
    from grouplora.ml.scoring import prompt_lengths
    return int(sum(prompt_lengths(tokenizer, [e.prompt for e in examples], max_length)))


def _normalized_weights(w, n: int) -> np.ndarray | None:
    if w is None:
        return None
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"sample_weights: need {n} finite non-negative weights with a positive sum")
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def _own_rng(model: torch.nn.Module):
    """Fork the CPU RNG and, for a CUDA model, its device's RNG (torch.manual_seed reseeds every device)."""
    device = _device_of(model)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(on: bool, total: int, initial: int):
    if not on:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step")


class _PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak, or the growth of this process's RSS
    sampled every 20 ms on a thread (tracemalloc and ru_maxrss miss torch's allocations / never reset)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil
        self._proc = psutil.Process()
        self._base = self._max = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._max = max(self._max, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, self._proc.memory_info().rss)
        self.peak = int(self._max - self._base)
