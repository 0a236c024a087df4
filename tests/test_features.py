"""Projected per-example LoRA gradients (hooks) against per-example autograd, the projection's properties,
and the first-order approximation error, on the tiny random Llama (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grouplora.ml.approx import approximation_errors, per_example_gradients
from grouplora.ml.features import compute_features
from grouplora.ml.lora import add_lora, is_fresh, lora_weights
from grouplora.ml.model import label_token_ids, load_base_model
from grouplora.ml.projection import Projection, split_dims
from grouplora.ml.scoring import predict_logprobs

PROMPTS = [
    "Review: the movie was wonderful. Sentiment:",
    "Hi. Sentiment:",
    "Review: a dull, boring film with a terrible plot and worse acting, honestly. Sentiment:",
    "Question: is the sky blue? Answer:",
    "Claim: fire is cold. Verdict:",
    "Email: win a free prize now, click here, you won. Label:",
    "ok",
]
LABELS = [0, 1, 1, 0, 1, 0, 1]


def _lora(fresh: bool = True, load_in_4bit: bool = False, tmp=None):
    model, tok = load_base_model("tiny", load_in_4bit=load_in_4bit, cache_dir=tmp)
    pm = add_lora(model, r=8, alpha=16, seed=0)
    if not fresh:  # an adapter "after training": B ≠ 0, so A's gradient is nonzero and must be hooked too
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, w in lora_weights(pm).items():
                if n.endswith("lora_B"):
                    w.copy_(0.05 * torch.randn(w.shape, generator=g))
    return pm, tok, label_token_ids(tok, [" positive", " negative"])


def _autograd_features(pm, tok, lab, proj: Projection) -> np.ndarray:
    grads = per_example_gradients(pm, tok, PROMPTS, LABELS, lab, proj.names)
    return torch.stack([proj.project({n: g.float() for n, g in gr.items()}) for gr in grads]).numpy()


@pytest.mark.parametrize("fresh", [True, False])
def test_hook_features_match_per_example_autograd(fresh):
    pm, tok, lab = _lora(fresh)
    assert is_fresh(pm) == fresh
    proj = Projection.for_model(pm, d=200, seed=0)
    assert all(n.endswith("lora_B") for n in proj.names) == fresh  # A is skipped only for a fresh LoRA
    f0, feats = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=4, max_length=64)
    ref = _autograd_features(pm, tok, lab, proj)
    assert feats.shape == (len(PROMPTS), 200) and feats.dtype == np.float32
    rel = np.linalg.norm(feats - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 1e-5, rel
    assert (np.linalg.norm(ref, axis=1) > 0).all()
    assert all(p.grad is None for p in pm.parameters())  # no .grad left behind


def test_features_are_reproducible_and_batch_invariant():
    pm, tok, lab = _lora(fresh=False)
    proj = Projection.for_model(pm, d=200, seed=3)
    a0, a = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=5, max_length=64)
    b0, b = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=5, max_length=64)
    c0, c = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=1, max_length=64)
    assert np.array_equal(a, b) and np.array_equal(a0, b0)  # same run twice: bit-identical
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())  # padding does not leak in
    np.testing.assert_allclose(c0, a0, atol=1e-5)
    # a second Projection object with the same seed is the same projection; another seed is not
    assert Projection.for_model(pm, d=200, seed=3).checksum() == proj.checksum()
    assert Projection.for_model(pm, d=200, seed=4).checksum() != proj.checksum()


def test_token_budget_features_equal_one_at_a_time():
    pm, tok, lab = _lora(fresh=False)
    proj = Projection.for_model(pm, d=200, seed=0)
    f1, g1 = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=1, max_length=64)
    for budget in (16, 100, 10_000):
        f, g = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=None, max_tokens=budget,
                                max_length=64)
        np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-6 * np.abs(g1).max())
        np.testing.assert_allclose(f, f1, atol=1e-5)


def test_one_forward_gives_the_zero_shot_logprobs():
    """At θ0 = a fresh LoRA (B = 0) the features pass's label log-probs are the base model's zero-shot
    scores: the zero_shot asset can read them off the same forward."""
    pm, tok, lab = _lora(fresh=True)
    proj = Projection.for_model(pm, d=200, seed=0)
    f0, feats, lp = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=None, max_tokens=100,
                                     max_length=64, return_logprobs=True)
    base, _ = load_base_model("tiny")  # the same weights, no LoRA layers at all
    zero_shot = predict_logprobs(base, tok, PROMPTS, lab, batch_size=16, max_length=64)
    assert lp.shape == (len(PROMPTS), 2) and lp.dtype == np.float32
    np.testing.assert_allclose(lp, zero_shot, atol=1e-5)
    # and f0 is the gold label's log-odds of those same log-probs
    y = np.array(LABELS)
    lo = lp[np.arange(len(y)), y] - np.log(np.exp(lp).sum(1) - np.exp(lp[np.arange(len(y)), y]))
    np.testing.assert_allclose(f0, lo, atol=1e-4)
    f0b, featsb = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=None, max_tokens=100,
                                   max_length=64)
    assert np.array_equal(f0b, f0) and np.array_equal(featsb, feats)  # the same pass, with or without them


def test_projection_factors_depend_on_seed_and_name_only():
    shapes = {"m.layers.0.q.lora_B": (64, 8), "m.layers.1.q.lora_B": (64, 8), "m.layers.0.q.lora_A": (8, 64)}
    p = Projection(shapes, d=200, seed=7)
    sub = Projection({"m.layers.1.q.lora_B": (64, 8)}, d=200, seed=7)  # order / other modules don't matter
    assert torch.equal(p.factors["m.layers.1.q.lora_B"][0], sub.factors["m.layers.1.q.lora_B"][0])
    assert not torch.equal(p.factors["m.layers.0.q.lora_B"][0], p.factors["m.layers.1.q.lora_B"][0])
    assert split_dims(64, 8, 200) == (25, 8) and split_dims(8, 64, 200) == (8, 25)
    assert split_dims(4096, 16, 200) == (20, 10)
    # rank side at full size -> identity there (exact isometry), the other side Gaussian with E[P Pᵀ] = I
    p_out, p_in = p.factors["m.layers.0.q.lora_B"]
    assert p_in is None and p_out.shape == (64, 25)
    assert abs(p_out.pow(2).sum(1).mean().item() - 1.0) < 0.1


def test_unproject_is_the_adjoint():
    """⟨φ(g), w⟩ = ⟨g, P w⟩ for any g, w: what lets θ0 + P w carry a fitted w back into LoRA weights."""
    shapes = {"a.lora_A": (8, 48), "a.lora_B": (96, 8), "b.lora_A": (4, 30), "b.lora_B": (30, 4)}
    proj = Projection(shapes, d=200, seed=0)
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    w = torch.randn(200, generator=g)
    delta = proj.unproject(w)
    assert {n: tuple(t.shape) for n, t in delta.items()} == shapes
    lhs = (proj.project(grads).double() @ w.double()).item()
    rhs = sum((grads[n].double() * delta[n].double()).sum().item() for n in shapes)
    assert abs(lhs - rhs) <= 1e-5 * max(1.0, abs(lhs))


def test_projection_preserves_inner_products():
    """JL: for a dense Gaussian P with d = 200, ⟨Pu,Pv⟩ − ⟨u,v⟩ has std √((‖u‖²‖v‖² + ⟨u,v⟩²)/d) ≤ 0.1‖u‖‖v‖.

    Random full-rank vectors: the Kronecker sum over modules measured the same or less (|err| std 0.04-0.06 on
    SmolLM2 shapes); we require |⟨Pu,Pv⟩ − ⟨u,v⟩| ≤ ε‖u‖‖v‖ with ε = 0.35 (≥ 3.5σ, < 1e-3 per pair).
    Real per-example gradients are the Kronecker design's weak case: a module's gradient is nearly rank 1
    (G ≈ u vᵀ gives ‖P_outᵀ G‖² = ‖P_outᵀu‖²‖v‖², a χ²(k1 = 25)/25 with std √(2/25) = 0.28) and the tiny
    model's gradient sits in ~4 v_proj matrices, so σ ≈ 0.28/√4 = 0.14 (measured 0.17-0.19 for norms,
    0.08-0.09 for cross pairs): ε_real = 0.6 (≥ 3σ)."""
    eps, eps_real = 0.35, 0.6
    pm, tok, lab = _lora(fresh=False)
    names = list(lora_weights(pm))
    real = per_example_gradients(pm, tok, PROMPTS, LABELS, lab, names)
    shapes = {n: tuple(w.shape) for n, w in lora_weights(pm).items()}

    def err(proj, a, b) -> float:
        ip = sum((a[n] * b[n]).sum().item() for n in names)
        na = sum(a[n].pow(2).sum().item() for n in names) ** 0.5
        nb = sum(b[n].pow(2).sum().item() for n in names) ** 0.5
        pa = proj.project({n: t.float() for n, t in a.items()}).double()
        pb = proj.project({n: t.float() for n, t in b.items()}).double()
        return abs((pa @ pb).item() - ip) / (na * nb)

    errs, errs_real, norms = [], [], []
    for seed in range(8):
        proj = Projection(shapes, d=200, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        u = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
        v = {n: u[n] + 0.5 * torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
        w = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
        errs += [err(proj, u, v), err(proj, u, u), err(proj, u, w)]
        errs_real += [err(proj, real[i], real[j]) for i, j in [(0, 1), (2, 3), (4, 5), (1, 1)]]
        norms.append(proj.project({n: t.float() for n, t in u.items()}).double().pow(2).sum().item()
                     / sum(u[n].pow(2).sum().item() for n in names))
    assert max(errs) <= eps, max(errs)
    assert max(errs_real) <= eps_real, max(errs_real)
    assert abs(np.mean(norms) - 1.0) < 0.1  # unbiased: E‖Pu‖² = ‖u‖²


def test_projection_state_is_small_for_smollm2_shapes():
    # SmolLM2-135M: 30 layers, q_proj 576 -> 576, v_proj 576 -> 192, r = 8; model 134.5M fp32 params
    shapes = {}
    for layer in range(30):
        for mod, out in (("q_proj", 576), ("v_proj", 192)):
            shapes[f"model.layers.{layer}.self_attn.{mod}.lora_A"] = (8, 576)
            shapes[f"model.layers.{layer}.self_attn.{mod}.lora_B"] = (out, 8)
    proj = Projection(shapes, d=200)
    assert proj.nbytes <= 0.05 * 134_515_008 * 4
    assert proj.nbytes < proj.dim * 200 * 4 / 20  # far below a dense D x d matrix


def test_first_order_error_is_small_near_theta0():
    pm, tok, lab = _lora(fresh=True)
    rows = approximation_errors(pm, tok, PROMPTS, LABELS, lab, scales=[0.001, 0.01, 0.1], n_draws=2, seed=0,
                                max_length=64)
    assert [r["scale"] for r in rows] == [0.001, 0.01, 0.1]
    assert rows[0]["median_rel_error"] < 1e-4 and rows[1]["median_rel_error"] < 1e-2
    # second order: the error grows faster than the move (10x scale -> far more than 10x error)
    assert rows[2]["median_rel_error"] > 20 * rows[1]["median_rel_error"] > 0
    assert all(r["mean_abs_change"] > 0 for r in rows)
    assert is_fresh(pm)  # the weights were restored


def test_hooks_on_4bit_base_give_true_gradients(tmp_path):
    """On a bitsandbytes nf4 base the hook features equal those of an fp32 twin holding the dequantised
    weights: gradients really flow through the frozen 4-bit layers, also after a no_grad scoring pass (which
    on AVX512-BF16 CPUs would otherwise switch bnb to a kernel without backward)."""
    bnb = pytest.importorskip("bitsandbytes")
    pm4, tok, lab = _lora(fresh=False, load_in_4bit=True, tmp=tmp_path)
    predict_logprobs(pm4, tok, PROMPTS, lab, max_length=64)
    pm32, _, _ = _lora(fresh=False)
    mods32 = dict(pm32.named_modules())
    n4 = 0
    with torch.no_grad():
        for name, mod in pm4.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
                mods32[name].weight.copy_(w)
                n4 += 1
    assert n4 == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    proj = Projection.for_model(pm4, d=200, seed=0)
    f4, feats4 = compute_features(pm4, tok, PROMPTS, LABELS, lab, proj, batch_size=4, max_length=64)
    f32, feats32 = compute_features(pm32, tok, PROMPTS, LABELS, lab, proj, batch_size=4, max_length=64)
    np.testing.assert_allclose(f4, f32, atol=1e-4)
    rel = np.linalg.norm(feats4 - feats32, axis=1) / np.linalg.norm(feats32, axis=1)
    assert rel.max() < 1e-4, rel


def test_lora_on_gives_the_features_of_a_copy_and_hands_the_base_back(tmp_path):
    """Features at θ0 from a LoRA put on the cached base and taken off again (no deepcopy of the base) equal
    those on a copy; the base comes back with the same weights, flags and mode, for fresh and saved adapters."""
    import copy

    from grouplora.ml.lora import lora_on
    from grouplora.ml.model import model_fingerprint

    base, tok = load_base_model("tiny")
    lab = label_token_ids(tok, [" positive", " negative"])
    fp, flags = model_fingerprint(base), [p.requires_grad for p in base.parameters()]
    ref = add_lora(copy.deepcopy(base), r=8, alpha=16, seed=0)
    proj = Projection.for_model(ref, d=200, seed=0)
    want = compute_features(ref, tok, PROMPTS, LABELS, lab, proj, batch_size=4, max_length=64)
    with lora_on(base, r=8, alpha=16, seed=0) as pm:
        got = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=4, max_length=64)
        pm.save_pretrained(str(tmp_path / "a"))
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    with lora_on(base, adapter=tmp_path / "a") as pm:
        assert all(w.requires_grad for w in lora_weights(pm).values())
        again = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=4, max_length=64)
    np.testing.assert_allclose(again[1], want[1], rtol=1e-5, atol=1e-7)
    assert model_fingerprint(base) == fp and [p.requires_grad for p in base.parameters()] == flags
    assert not base.training and not any("lora_" in n for n, _ in base.named_modules())
    with lora_on(base, r=8, alpha=16, seed=0) as pm, pytest.raises(ValueError, match="already carries LoRA"):
        with lora_on(pm.get_base_model()):  # a base with LoRA layers in it is refused, not stacked
            pass


def test_bf16_base_keeps_fp32_lora_master_weights(tmp_path):
    """A bf16 base (GPU path: `dtype` of load_base_model) gets fp32 LoRA weights from peft (autocast_adapter_dtype),
    for a fresh LoRA, a loaded adapter and through training (the optimizer steps fp32 master weights); features and
    scores stay close to the fp32 model's."""
    from grouplora.ml.lora import lora_on
    from grouplora.ml.training import TrainConfig, TrainExample, train_adapter

    b16, tok = load_base_model("tiny", dtype=torch.bfloat16)
    f32, _ = load_base_model("tiny")
    lab = label_token_ids(tok, [" positive", " negative"])
    assert {p.dtype for p in b16.parameters()} == {torch.bfloat16}
    with lora_on(b16, r=8, alpha=16, seed=0) as pm, lora_on(f32, r=8, alpha=16, seed=0) as ref:
        assert {w.dtype for w in lora_weights(pm).values()} == {torch.float32}
        proj = Projection.for_model(ref, d=200, seed=0)
        got = compute_features(pm, tok, PROMPTS, LABELS, lab, proj, batch_size=4, max_length=64,
                               return_logprobs=True)
        want = compute_features(ref, tok, PROMPTS, LABELS, lab, proj, batch_size=4, max_length=64,
                                return_logprobs=True)
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in got)
    np.testing.assert_allclose(got[2], want[2], atol=0.05)  # label log-probs: bf16 rounding of a random model
    cos = (got[1] * want[1]).sum(1) / np.linalg.norm(got[1], axis=1) / np.linalg.norm(want[1], axis=1)
    assert cos.min() > 0.95, cos
    ex = [TrainExample(p, y, lab) for p, y in zip(PROMPTS, LABELS)]
    res = train_adapter((b16, tok), ex, TrainConfig(lr=1e-2, epochs=1, batch_size=4), tmp_path / "a")
    assert np.isfinite(res.final_loss)
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(tmp_path / "a" / "adapter_model.safetensors").values()} == {torch.float32}
    with lora_on(b16, adapter=tmp_path / "a") as pm:
        assert {w.dtype for w in lora_weights(pm).values()} == {torch.float32}
        assert np.isfinite(predict_logprobs(pm, tok, PROMPTS, lab, max_tokens=64, max_length=64)).all()
    assert {p.dtype for p in b16.parameters()} == {torch.bfloat16}
