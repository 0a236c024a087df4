"""The ensemble's adapters in one pass (peft mixed-adapter batch) and merged into one adapter, on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from grouplora.ml.ensemble import (AdapterSpec, DatasetSpec, Ensemble, _peft_name, adapter_logprobs, combine,
                                   loaded_model, merged_logprobs, predict, release)
from grouplora.ml.inference import adapter_rows, merge_adapters
from grouplora.ml.lora import add_lora
from grouplora.ml.model import label_token_ids, model_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [" positive", " negative", " neutral"]
PROMPTS = [f"Review: the film was {'really ' * (i % 4)}{w} {i}. Sentiment:"
           for i, w in enumerate(["wonderful", "dull", "fine", "great", "boring"] * 2)]
# different ranks and target modules: a layer the adapter does not touch must stay base-only for its rows
CONFIGS = [dict(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
           dict(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
           dict(r=4, alpha=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))]


def random_adapters(model, root: Path, scale: float = 0.3) -> list[Path]:
    """Saved adapters with seeded random A and B (B ≠ 0, so each changes the outputs)."""
    paths = []
    for s, cfg in enumerate(CONFIGS):
        pm = add_lora(model, seed=s, **cfg)
        g = torch.Generator().manual_seed(50 + s)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(scale * torch.randn(p.shape, generator=g))
        pm.save_pretrained(root / f"a{s}")
        pm.unload()
        paths.append(root / f"a{s}")
    return paths


def make_ensemble(model, tok, root: Path, scale: float = 0.3) -> Ensemble:
    paths = random_adapters(model, root, scale)
    return Ensemble(base_model="tiny", base_fingerprint=model_fingerprint(model),
                    adapters=[AdapterSpec(p.name, str(p)) for p in paths],
                    weights={"d": {"a0": 1.2, "a1": 0.5, "a2": 0.8}, "one": {"a1": 2.0, "a0": 0.0}},
                    datasets={t: DatasetSpec(WORDS, "Review: {text} Sentiment:", label_token_ids(tok, WORDS))
                              for t in ("d", "one")})


@pytest.fixture()
def ens(tiny, tmp_path):
    model, tok = tiny
    e = make_ensemble(model, tok, tmp_path)
    yield e
    release(model)


def count_forwards(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Rows of every decoder forward, via a hook on the base model's decoder."""
    rows: list[int] = []
    h = model.get_decoder().register_forward_hook(lambda m, args, kw, out: rows.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    return rows, h


def test_one_pass_equals_the_loop_in_one_forward_per_batch(tiny, ens):
    model, tok = tiny
    names = ["a0", "a1", "a2"]
    loop = adapter_logprobs(ens, model, tok, "d", PROMPTS, names, batch_size=4, one_pass=False)
    rows, h = count_forwards(model)
    try:
        one = adapter_logprobs(ens, model, tok, "d", PROMPTS, names, batch_size=4)
    finally:
        h.remove()
    assert one.shape == (3, len(PROMPTS), 3)
    np.testing.assert_allclose(one, loop, atol=1e-5)
    # the adapters really differ from each other (else "equal to the loop" proves nothing)
    assert min(np.abs(loop[i] - loop[j]).max() for i in range(3) for j in range(i + 1, 3)) > 1e-2
    assert rows == [12, 12, 6]  # 10 prompts in batches of 4 -> 3 forwards of 3 adapters x (4, 4, 2) prompts
    assert not any(m._forward_pre_hooks for m in loaded_model(model, {}).modules())  # no hook left behind


def test_one_pass_token_budget_covers_all_adapters_rows(tiny, ens):
    """max_tokens bounds a whole forward: K adapters' copies of the batch's prompts x their padded length."""
    model, tok = tiny
    names = ["a0", "a1", "a2"]
    loop = adapter_logprobs(ens, model, tok, "d", PROMPTS, names, batch_size=1, one_pass=False)
    shapes: list[tuple[int, int]] = []
    h = model.get_decoder().register_forward_hook(
        lambda m, args, kw, out: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    longest = max(len(r) for r in tok(PROMPTS)["input_ids"])
    budget = 3 * 3 * longest  # room for 3 of the longest prompts under 3 adapters
    try:
        one = adapter_logprobs(ens, model, tok, "d", PROMPTS, names, max_tokens=budget)
    finally:
        h.remove()
    np.testing.assert_allclose(one, loop, atol=1e-5)
    assert all(r * t <= budget for r, t in shapes), shapes
    assert sum(r for r, _ in shapes) == 3 * len(PROMPTS) and len(shapes) < len(PROMPTS)  # batched, each once


def test_adapter_rows_checks_names_and_cleans_up(tiny, ens):
    model, tok = tiny
    pm = loaded_model(model, {n: ens.adapter_path(n) for n in ("a0", "a1")})
    with pytest.raises(ValueError, match="nope"):
        with adapter_rows(pm, ["nope"]):
            pass
    key = _peft_name("a0", ens.adapter_path("a0"))
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # peft's own check, 1 name for 2 rows
        with adapter_rows(pm, [key]):
            pm.get_base_model().get_decoder()(input_ids=torch.ones(2, 3, dtype=torch.long))
    assert not any(m._forward_pre_hooks for m in pm.modules())  # removed although the forward raised


def delta_errors(pm, merged: str, w_hat: dict[str, float]) -> list[float]:
    """max |ΔW_merged − Σ ŵ_k ΔW_k| of each LoRA layer that has the merged adapter."""
    out = []
    for m in pm.modules():
        if hasattr(m, "get_delta_weight") and merged in getattr(m, "lora_A", {}):
            want = sum(w * m.get_delta_weight(k) for k, w in w_hat.items() if k in m.lora_A)
            out.append(float((m.get_delta_weight(merged) - want).abs().max()))
    return out


def test_cat_merge_is_the_weighted_sum_of_the_deltas_and_linear_is_not(tiny, ens):
    model, _ = tiny
    # a0 (r 4, q/v) and a2 (r 4, five targets): same rank, so peft's "linear" can merge them too
    pm = loaded_model(model, {n: ens.adapter_path(n) for n in ("a0", "a2")})
    k0, k2 = (_peft_name(n, ens.adapter_path(n)) for n in ("a0", "a2"))
    alpha = {k0: 1.5, k2: 0.5}
    w_hat = {k0: 0.75, k2: 0.25}
    cat, temperature = merge_adapters(pm, alpha)
    assert temperature == 2.0
    err = delta_errors(pm, cat, w_hat)
    assert len(err) == 2 * 5 and max(err) < 1e-6  # every layer either adapter touches, in both blocks
    assert merge_adapters(pm, alpha) == (cat, 2.0)  # cached, not rebuilt
    assert merge_adapters(pm, {k0: 3.0, k2: 0.0}) == (k0, 3.0)  # one adapter with α > 0: itself, no merge

    lin, _ = merge_adapters(pm, alpha, combination_type="linear")
    size = max(float(m.get_delta_weight(k0).abs().max()) for m in pm.modules()
               if hasattr(m, "get_delta_weight") and k0 in getattr(m, "lora_A", {}))
    assert max(delta_errors(pm, lin, w_hat)) > 0.1 * size  # the cross terms B_k A_j: a different update
    # even one adapter with itself: (√.5 + √.5)² BA = 2·BA, not BA; linear is exact for one adapter only
    pm.add_weighted_adapter([k0, k0], [0.5, 0.5], "lin_self", combination_type="linear")
    assert max(delta_errors(pm, "lin_self", {k0: 2.0})) < 1e-6
    pm.add_weighted_adapter([k0], [0.7], "lin_one", combination_type="linear")
    assert max(delta_errors(pm, "lin_one", {k0: 0.7})) < 1e-6

    with pytest.raises(ValueError, match="combination_type"):
        merge_adapters(pm, alpha, combination_type="svd")
    with pytest.raises(ValueError, match="weight > 0"):
        merge_adapters(pm, {k0: 0.0})


def test_merged_logprobs_and_predict(tiny, ens):
    model, tok = tiny
    # one adapter with α = 2: the merged model is that adapter, at the ensemble's temperature
    z = adapter_logprobs(ens, model, tok, "one", PROMPTS, ["a1"])
    np.testing.assert_allclose(merged_logprobs(ens, model, tok, "one", PROMPTS), log_softmax(2.0 * z[0], -1),
                               atol=1e-5)
    # another weighting of the same adapters builds another merged adapter (nothing stale is reused)
    m1 = merged_logprobs(ens, model, tok, "d", PROMPTS)
    m2 = merged_logprobs(ens, model, tok, "d", PROMPTS, weights={"a0": 0.2, "a1": 0.5, "a2": 2.0})
    assert np.abs(m1 - m2).max() > 1e-3
    labels, probs = predict(ens, model, tok, "d", PROMPTS, merged=True)
    np.testing.assert_allclose(probs, np.exp(m1), atol=1e-6)
    assert np.array_equal(labels, m1.argmax(-1))


def merge_gap(model, tok, root: Path, scale: float) -> tuple[float, float]:
    """(max |merged − ensemble|, max |no adapter − ensemble|) of label log-probs, adapters' B ~ scale."""
    from grouplora.ml.scoring import predict_logprobs

    ens = make_ensemble(model, tok, root, scale=scale)
    try:
        names = ["a0", "a1", "a2"]
        alpha = np.array([ens.weights["d"][n] for n in names])
        ensemble = log_softmax(combine(adapter_logprobs(ens, model, tok, "d", PROMPTS, names), alpha), -1)
        merged = merged_logprobs(ens, model, tok, "d", PROMPTS)
        pm = loaded_model(model, {})
        with pm.disable_adapter():
            z0 = predict_logprobs(pm, tok, PROMPTS, ens.datasets["d"].label_ids)
        base = log_softmax(alpha.sum() * z0, -1)  # the same temperature, no adapter at all
        return float(np.abs(merged - ensemble).max()), float(np.abs(base - ensemble).max())
    finally:
        release(model)


def test_merge_matches_the_ensemble_to_first_order(tiny, tmp_path):
    """Halving every Δ_k halves the ensemble's effect but quarters the merge's error: the error is second order."""
    model, tok = tiny
    err2, effect2 = merge_gap(model, tok, tmp_path / "s2", 0.02)
    err1, effect1 = merge_gap(model, tok, tmp_path / "s1", 0.01)
    assert 1.6 < effect2 / effect1 < 2.4
    assert err2 / err1 > 3.0
    assert err1 < 0.1 * effect1


def test_benchmark_script_writes_the_agreed_keys(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ensemble_inference

    out = tmp_path / "bench.json"
    res = ensemble_inference.main(["--model", "tiny", "--n", "6", "--batch-size", "4", "--rounds", "1",
                                   "--latency-reps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["k"] == 3 and saved["n"] == 6
    for key in ("one_adapter_s", "loop_s", "one_pass_s", "merged_s"):
        assert saved[key] > 0
    assert saved[ensemble_inference.RATIO] == pytest.approx(saved["one_pass_s"] / (3 * saved["one_adapter_s"]))
    assert saved["max_abs_logprob_diff_one_pass_vs_loop"] < 1e-5 and res["command"].endswith(str(out))
