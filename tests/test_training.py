"""LoRA training on the tiny random Llama: it learns a keyword task, resumes bit-for-bit, saves a loadable
adapter, leaves a passed base untouched, runs QLoRA on CPU, and counts FLOPs by the stated formula."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from grouplora.ml.flops import forward_flops, full_training_flops, lora_training_flops, matmul_params
from grouplora.ml.model import label_token_ids, load_base_model, model_fingerprint
from grouplora.ml.scoring import encode, label_logits
from grouplora.ml.training import (TrainConfig, TrainExample, evaluate, latest_checkpoint, save_fresh_adapter,
                                   train_adapter)


pytestmark = pytest.mark.usefixtures("one_thread")


FILL = ["the movie", "a film", "the plot", "the acting", "it", "the end"]


def toy_examples(tok, n: int = 24) -> list[TrainExample]:
    """Two datasets with different label sets (2 and 3 classes); a keyword decides the label."""
    senti = label_token_ids(tok, [" positive", " negative"])
    claim = label_token_ids(tok, [" true", " false", " neither"])
    ex = []
    for i in range(n):
        y = i % 2
        ex.append(TrainExample(f"Review: {FILL[i % 6]} was {['wonderful', 'boring'][y]} and "
                               f"{FILL[(i + 2) % 6]}. Sentiment:", y, senti))
    for i in range(n):
        y = i % 3
        ex.append(TrainExample(f"Claim: {['water boils', 'the moon is cheese', 'fire'][y]} at "
                               f"{FILL[i % 6]}. Verdict:", y, claim))
    return ex


def adapter_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "adapter_model.safetensors")


def assert_same_state(a: Path, b: Path, atol: float = 0.0) -> None:
    sa, sb = adapter_state(a), adapter_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


def has_lora(model) -> bool:
    return any("lora_A" in n for n, _ in model.named_modules())


def test_training_learns_mixed_datasets_and_leaves_base_untouched(tiny, tmp_path):
    model, tok = tiny
    ex = toy_examples(tok)
    loss0, acc0 = evaluate(model, tok, ex)
    fp0 = model_fingerprint(model)
    steps = []
    cfg = TrainConfig(lr=1e-2, epochs=6, batch_size=8, seed=0, dropout=0.1)
    rng = torch.get_rng_state()
    res = train_adapter((model, tok), ex, cfg, tmp_path / "a", on_step=lambda s, m: steps.append((s, m)))
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched

    # the base is handed back as it came: no LoRA layers, same weights, frozen flags restored, eval mode
    assert not has_lora(model) and not isinstance(model, PeftModel)
    assert model_fingerprint(model) == fp0 and not model.training
    assert all(p.requires_grad for p in model.parameters())

    n_steps = 6 * 6  # 48 examples / batch 8 = 6 steps per epoch
    assert res.steps == n_steps and res.resumed_from_epoch == 0
    assert [s for s, m in steps if "loss" in m] == list(range(1, n_steps + 1))
    assert [m["epoch_loss"] for _, m in steps if "epoch_loss" in m] == res.epoch_losses
    assert res.epoch_losses[-1] < 0.7 * res.epoch_losses[0] and res.final_loss == res.epoch_losses[-1]
    assert res.tokens > 48 * 6 * 5 and res.seconds > 0 and res.peak_memory_bytes >= 0
    assert res.flops == lora_training_flops(res.n_base_params, res.n_lora_params, res.tokens)

    # the standard peft folder loads and the trained adapter beats the base on the task
    out = tmp_path / "a"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"epoch_{k}" for k in range(1, 7)]
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(out))  # a copy: peft freezes the shared base
    loss1, acc1 = evaluate(pm, tok, ex)
    pm.unload()
    assert loss1.mean() < 0.6 * loss0.mean()
    assert acc1.mean() >= 0.95 and acc1.mean() > acc0.mean()

    # the final adapter is the last epoch's checkpoint
    assert_same_state(out, out / "checkpoints" / "epoch_6")


def test_saved_adapter_gives_the_logits_of_its_merged_weights(tiny, tmp_path):
    """PeftModel.from_pretrained(saved) == base with W + (alpha/r)·B·A merged by hand from the safetensors."""
    model, tok = tiny
    ex = toy_examples(tok, 6)
    cfg = TrainConfig(r=4, alpha=8, lr=1e-2, epochs=2, batch_size=4, target_modules=("q_proj", "v_proj", "down_proj"))
    train_adapter((model, tok), ex, cfg, tmp_path / "a")
    enc = encode(tok, [e.prompt for e in ex], 64)
    labels = torch.tensor(ex[0].label_ids)
    with torch.no_grad():
        merged = load_base_model("tiny")[0]
        state = adapter_state(tmp_path / "a")
        n_merged = 0
        for name, mod in merged.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in state:
                B = state[key.replace("lora_A", "lora_B")]
                assert B.abs().sum() > 0  # training moved B off its zero init
                mod.weight += (8 / 4) * B @ state[key]
                n_merged += 1
        assert n_merged == 3 * 2
        want = label_logits(merged, enc["input_ids"], enc["attention_mask"], labels)
        pm = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"))  # a copy: peft freezes the base
        got = label_logits(pm, enc["input_ids"], enc["attention_mask"], labels)
        pm.unload()
        base = label_logits(model, enc["input_ids"], enc["attention_mask"], labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapter does change the logits


class Killed(Exception):
    pass


def test_killed_run_resumes_bit_for_bit(tiny, tmp_path):
    model, tok = tiny
    ex = toy_examples(tok, 12)  # 24 examples, batch 8 -> 3 steps per epoch
    # dropout > 0 and warmup + linear decay: resuming must restore the RNG and the schedule, not only weights
    cfg = TrainConfig(lr=5e-3, epochs=3, batch_size=8, dropout=0.2, warmup_ratio=0.3, seed=3, weight_decay=0.01)
    full = train_adapter((model, tok), ex, cfg, tmp_path / "full")

    def kill(step, m):
        if step == 5:  # second step of epoch 2: the epoch_1 checkpoint exists, epoch 2 is half done
            raise Killed

    with pytest.raises(Killed):
        train_adapter((model, tok), ex, cfg, tmp_path / "run", on_step=kill)
    assert latest_checkpoint(tmp_path / "run").name == "epoch_1"
    assert not (tmp_path / "run" / "train_result.json").exists()
    assert not has_lora(model)  # even a crash hands the base back clean
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch_1" / "trainer_state.pt", weights_only=True)
    assert state["state"]["epoch"] == 1 and state["state"]["step"] == 3

    resumed = train_adapter((model, tok), ex, cfg, tmp_path / "run")
    assert resumed.resumed_from_epoch == 1 and resumed.steps == full.steps == 9
    assert resumed.tokens == full.tokens
    np.testing.assert_allclose(resumed.epoch_losses, full.epoch_losses, rtol=0, atol=1e-6)
    assert_same_state(tmp_path / "run", tmp_path / "full", atol=1e-6)
    for k in (1, 2, 3):
        assert_same_state(tmp_path / "run" / "checkpoints" / f"epoch_{k}",
                          tmp_path / "full" / "checkpoints" / f"epoch_{k}", atol=1e-6)

    # a finished run returns its result without training again
    calls = []
    again = train_adapter((model, tok), ex, cfg, tmp_path / "run", on_step=lambda s, m: calls.append(s))
    assert calls == [] and again.epoch_losses == resumed.epoch_losses

    # another config in the same folder is refused, not silently mixed
    with pytest.raises(ValueError, match="another config"):
        train_adapter((model, tok), ex, TrainConfig(lr=1e-3, epochs=4, batch_size=8), tmp_path / "run")


def test_more_epochs_continue_from_the_last_checkpoint(tiny, tmp_path):
    """epochs=1 then epochs=2 on the same folder == one 2-epoch run (constant LR: the schedule has no length)."""
    model, tok = tiny
    ex = toy_examples(tok, 12)
    cfg = TrainConfig(lr=5e-3, epochs=2, batch_size=8, dropout=0.1, lr_schedule="constant", seed=1, warmup_ratio=0.0)
    two = train_adapter((model, tok), ex, cfg, tmp_path / "two")
    one = train_adapter((model, tok), ex, TrainConfig(**{**cfg.__dict__, "epochs": 1}), tmp_path / "ext")
    assert one.steps == 3
    ext = train_adapter((model, tok), ex, cfg, tmp_path / "ext")
    assert ext.resumed_from_epoch == 1 and ext.steps == 6
    np.testing.assert_allclose(ext.epoch_losses, two.epoch_losses, rtol=0, atol=1e-6)
    assert_same_state(tmp_path / "ext", tmp_path / "two", atol=1e-6)

    # a decaying schedule is stretched to the new length: step 4 of 6 runs at lr·(1 − 3/6), not at the
    # 1-epoch curve's 0
    lin = TrainConfig(**{**cfg.__dict__, "lr_schedule": "linear", "epochs": 1})
    train_adapter((model, tok), ex, lin, tmp_path / "lin")
    lrs = {}
    train_adapter((model, tok), ex, TrainConfig(**{**lin.__dict__, "epochs": 2}), tmp_path / "lin",
                  on_step=lambda s, m: lrs.update({s: m["lr"]}) if "lr" in m else None)
    assert sorted(lrs) == [4, 5, 6]
    np.testing.assert_allclose([lrs[4], lrs[6]], [5e-3 * 0.5, 5e-3 / 6], rtol=1e-9)

    # fewer epochs than a folder holds: the adapter of that epoch, nothing trained
    back = train_adapter((model, tok), ex, TrainConfig(**{**cfg.__dict__, "epochs": 1}), tmp_path / "two")
    assert back.steps == 3 and back.epoch_losses == two.epoch_losses[:1]
    assert_same_state(tmp_path / "two", tmp_path / "two" / "checkpoints" / "epoch_1")


def test_adapters_do_not_leak_between_runs_on_one_base(tiny, tmp_path):
    """Training adapter 2 on a base that just trained adapter 1 == training it on a freshly loaded base."""
    model, tok = tiny
    ex = toy_examples(tok, 6)
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4, seed=5)
    train_adapter((model, tok), ex[:6], TrainConfig(lr=1e-2, epochs=2, batch_size=4), tmp_path / "first")
    train_adapter((model, tok), ex, cfg, tmp_path / "second")
    fresh, tok2 = load_base_model("tiny")
    train_adapter(fresh, ex, cfg, tmp_path / "fresh", tokenizer=tok2)
    assert_same_state(tmp_path / "second", tmp_path / "fresh")
    with pytest.raises(ValueError, match="tokenizer"):
        train_adapter(fresh, ex, cfg, tmp_path / "x")


def test_sample_weights_rescale_to_mean_one(tiny, tmp_path):
    model, tok = tiny
    ex = toy_examples(tok, 6)
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4)
    train_adapter((model, tok), ex, cfg, tmp_path / "plain")
    train_adapter((model, tok), ex, cfg, tmp_path / "x3", sample_weights=np.full(len(ex), 3.0))
    assert_same_state(tmp_path / "plain", tmp_path / "x3", atol=1e-6)  # only relative weights matter
    w = np.where(np.arange(len(ex)) < 6, 1.0, 0.0)  # only the sentiment examples count
    train_adapter((model, tok), ex, cfg, tmp_path / "senti", sample_weights=w)
    a, b = adapter_state(tmp_path / "plain"), adapter_state(tmp_path / "senti")
    assert any((a[k] - b[k]).abs().max() > 1e-4 for k in a)
    with pytest.raises(ValueError, match="sample_weights"):
        train_adapter((model, tok), ex, cfg, tmp_path / "bad", sample_weights=-w)


def test_max_steps_and_fresh_adapter(tiny, tmp_path):
    model, tok = tiny
    ex = toy_examples(tok, 6)
    res = train_adapter((model, tok), ex, TrainConfig(epochs=5, batch_size=4, max_steps=4), tmp_path / "m")
    assert res.steps == 4 and len(res.epoch_losses) == 2  # 3 steps per epoch: one full epoch + one step
    assert latest_checkpoint(tmp_path / "m").name == "epoch_1"
    save_fresh_adapter((model, tok), TrainConfig(seed=7), tmp_path / "fresh")
    st = adapter_state(tmp_path / "fresh")
    assert all((v == 0).all() for k, v in st.items() if "lora_B" in k)
    assert all(v.abs().sum() > 0 for k, v in st.items() if "lora_A" in k)
    assert not has_lora(model)


def test_qlora_runs_a_step_on_a_4bit_base(tmp_path):
    try:
        model, tok = load_base_model("tiny", load_in_4bit=True)
    except Exception as e:  # no bitsandbytes, or no 4-bit kernels for this device
        pytest.skip(f"4-bit load unavailable: {e}")
    ex = toy_examples(tok, 4)
    with pytest.raises(ValueError, match="4-bit"):
        train_adapter((model, tok), ex, TrainConfig(), tmp_path / "no")
    res = train_adapter((model, tok), ex, TrainConfig(qlora=True, max_steps=1, batch_size=4, lr=1e-2), tmp_path / "q")
    assert res.steps == 1 and np.isfinite(res.final_loss)
    st = adapter_state(tmp_path / "q")
    assert any(v.abs().sum() > 0 for k, v in st.items() if "lora_B" in k)  # the step moved B
    # 4-bit Linear weights are packed, yet count in full: same N as the fp32 tiny model
    assert matmul_params(model) == matmul_params(load_base_model("tiny")[0])
    assert not has_lora(model)


def test_flop_formula_on_the_tiny_config(tiny):
    model, _ = tiny
    c = model.config
    h, i, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    n_base = L * (h * h + 2 * h * kv + h * h + 3 * h * i)  # q, k, v, o, gate/up/down; no embeddings, no lm_head
    assert matmul_params(model) == (n_base, 0) == (73728, 0)
    from grouplora.ml.lora import add_lora
    # on a copy: peft freezes the base's parameters and unload() does not thaw them; the module's shared `tiny`
    # must stay as the other tests (in any order) expect it
    pm = add_lora(copy.deepcopy(model), r=8, target_modules=("q_proj", "v_proj"))
    n_lora = L * (8 * h + h * 8 + 8 * h + kv * 8)
    assert matmul_params(pm) == (n_base, n_lora) == (73728, 3584)
    pm.unload()
    T = 1000
    assert forward_flops(n_base, T) == 2 * 73728 * 1000
    assert full_training_flops(n_base, T) == 3 * forward_flops(n_base, T)
    assert lora_training_flops(n_base, n_lora, T) == 4 * 73728 * 1000 + 6 * 3584 * 1000 == 316_416_000


def test_warm_start_from_a_saved_adapter(tiny, tmp_path):
    """init_adapter: training starts from those weights (lr 0 keeps them exactly), the warm start is part of
    the run's identity, and an adapter of another rank is refused."""
    model, tok = tiny
    ex = toy_examples(tok, 6)
    train_adapter((model, tok), ex, TrainConfig(epochs=1, batch_size=4, lr=1e-2), tmp_path / "meta")
    frozen = TrainConfig(epochs=1, batch_size=4, lr=0.0, seed=3)  # another seed: a fresh start would differ
    train_adapter((model, tok), ex, frozen, tmp_path / "warm", init_adapter=tmp_path / "meta")
    assert_same_state(tmp_path / "meta", tmp_path / "warm")
    with pytest.raises(ValueError, match="another config"):  # the cold run is another run: never resumed from it
        train_adapter((model, tok), ex, frozen, tmp_path / "warm")
    with pytest.raises(ValueError, match="r=8"):
        train_adapter((model, tok), ex, TrainConfig(r=4), tmp_path / "bad", init_adapter=tmp_path / "meta")
    assert not has_lora(model)


def flipped_labels(examples: list[TrainExample]) -> list[TrainExample]:
    """The same prompts with the binary labels swapped: validation that contradicts training."""
    return [TrainExample(e.prompt, 1 - e.label_index if len(e.label_ids) == 2 else e.label_index, e.label_ids)
            for e in examples]


def test_best_validation_epoch_is_the_saved_adapter(tiny, tmp_path):
    """With val_examples every epoch is scored and the saved adapter is the epoch with the lowest val loss: on
    validation examples whose labels contradict training, that is the first epoch, not the last."""
    model, tok = tiny
    ex = toy_examples(tok, 12)
    flipped = flipped_labels(ex[:12])
    cfg = TrainConfig(lr=1e-2, epochs=3, batch_size=8, seed=2)
    res = train_adapter((model, tok), ex, cfg, tmp_path / "anti", val_examples=flipped)
    assert res.epochs == 3 and len(res.val_losses) == 3 and res.eval_flops > 0
    assert res.best_epoch == int(np.argmin(res.val_losses)) + 1 < 3  # learning the task hurts the flipped labels
    assert_same_state(tmp_path / "anti", tmp_path / "anti" / "checkpoints" / f"epoch_{res.best_epoch}")
    pm = PeftModel.from_pretrained(model, str(tmp_path / "anti"))
    ce, _ = evaluate(pm, tok, flipped)
    pm.unload()
    np.testing.assert_allclose(ce.mean(), res.val_losses[res.best_epoch - 1], rtol=1e-5)
    # the saved epoch's log-probs on val are kept beside it, for exactly these examples
    from grouplora.ml.training import validation_logprobs
    lp = validation_logprobs(tmp_path / "anti", flipped)
    y = np.array([e.label_index for e in flipped])
    np.testing.assert_allclose(-lp[np.arange(len(y)), y], ce, atol=1e-5)
    assert validation_logprobs(tmp_path / "anti", flipped[:-1]) is None
    # the same examples as validation: the loss falls, the last epoch is kept
    ok = train_adapter((model, tok), ex, cfg, tmp_path / "ok", val_examples=ex[:12])
    assert ok.best_epoch == 3 and ok.val_losses[-1] < ok.val_losses[0]
    # without val_examples: the last epoch, no val losses, the key (and so resumption) as before
    plain = train_adapter((model, tok), ex, cfg, tmp_path / "plain")
    assert plain.best_epoch == plain.epochs == 3 and plain.val_losses == [] and plain.eval_flops == 0


def test_best_epoch_survives_a_resume(tiny, tmp_path):
    model, tok = tiny
    ex = toy_examples(tok, 12)
    flipped = flipped_labels(ex[:12])
    cfg = TrainConfig(lr=1e-2, epochs=3, batch_size=8, seed=2)
    full = train_adapter((model, tok), ex, cfg, tmp_path / "full", val_examples=flipped)

    def kill(step, m):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_adapter((model, tok), ex, cfg, tmp_path / "run", val_examples=flipped, on_step=kill)
    res = train_adapter((model, tok), ex, cfg, tmp_path / "run", val_examples=flipped)
    assert res.resumed_from_epoch == 2 and res.best_epoch == full.best_epoch
    from grouplora.ml.training import validation_logprobs
    assert validation_logprobs(tmp_path / "full", flipped) is not None
    if res.best_epoch <= res.resumed_from_epoch:  # scored before the kill: not in this process, not kept
        assert validation_logprobs(tmp_path / "run", flipped) is None
    np.testing.assert_allclose(res.val_losses, full.val_losses, atol=1e-6)
    assert_same_state(tmp_path / "run", tmp_path / "full", atol=1e-6)
    with pytest.raises(ValueError, match="another config"):  # other validation examples: another run
        train_adapter((model, tok), ex, cfg, tmp_path / "run", val_examples=ex[:4], on_step=kill)


def test_evaluate_is_batch_invariant_and_keeps_the_order(tiny):
    model, tok = tiny
    ex = toy_examples(tok, 9)
    l1, c1 = evaluate(model, tok, ex, batch_size=1)
    for kw in ({"batch_size": 16}, {"batch_size": None, "max_tokens": 40}):
        l2, c2 = evaluate(model, tok, ex, **kw)
        np.testing.assert_allclose(l2, l1, atol=1e-5)
        assert np.array_equal(c2, c1)
    assert len(set(np.round(l1, 4))) > 3  # rows differ: the order was restored, not one row copied


def test_length_grouped_batches_keep_the_batch_size_and_cut_padding(tiny, tmp_path, monkeypatch):
    """Every step still takes batch_size examples (same steps per epoch); grouping by length pads less than
    plain shuffling (length_window = 1), and both learn the task."""
    import grouplora.ml.training as training

    model, tok = tiny
    ex = toy_examples(tok, 24)
    ex += [TrainExample(e.prompt.replace("Review:", "Review: " + "long and winding " * (i % 4)), e.label_index,
                        e.label_ids) for i, e in enumerate(ex[:24])]  # a spread of lengths
    seen: list[tuple[int, int]] = []

    def spy(tokenizer, prompts, max_length):  # the real encode; records the (batch, padded length) of each step
        enc = encode(tokenizer, prompts, max_length)
        seen.append(tuple(enc["input_ids"].shape))
        return enc

    monkeypatch.setattr(training, "encode", spy)
    padded = {}
    for window in (1, 8):
        seen.clear()
        cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=8, seed=0, length_window=window)
        res = train_adapter((model, tok), ex, cfg, tmp_path / f"w{window}")
        assert res.steps == 2 * 9 and [b for b, _ in seen] == [8] * 18  # 72 examples: 9 full steps an epoch
        padded[window] = sum(b * t for b, t in seen)
        assert res.epoch_losses[-1] < res.epoch_losses[0]
    assert padded[8] < 0.9 * padded[1]
