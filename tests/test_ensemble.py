"""Per-dataset ensemble weights, the Ensemble description and its predictions, and boosting rounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from scipy.special import log_softmax, softmax

from grouplora.ml.boosting import (BoostResult, BoostSettings, RidgeBase, boost_adapter_from_w, boost_group,
                                   boosted_logits, gold_margins, keep_round, line_search, logprobs_by_dataset,
                                   negative_gradient, pooled_loss, ridge_boost, round_logits)
from grouplora.ml.ensemble import (AdapterSpec, DatasetSpec, Ensemble, combine, ensemble_loss, fit_all,
                                   fit_dataset_weights, fit_weights, loaded_model, predict, release, score_dataset,
                                   weights_for)
from grouplora.ml.features import compute_features
from grouplora.ml.folds import split_validation
from grouplora.ml.lora import load_adapter
from grouplora.ml.model import label_token_ids, load_base_model, model_fingerprint
from grouplora.ml.projection import Projection
from grouplora.ml.scoring import encode, label_logits, predict_logprobs
from grouplora.ml.training import VAL_LOGPROBS, TrainConfig, TrainExample, save_fresh_adapter, train_adapter


pytestmark = pytest.mark.usefixtures("one_thread")


def has_lora(model) -> bool:
    return any("lora_A" in n for n, _ in model.named_modules())


# ------------------------------------------------------------------------------------------- weights


def planted_logits(rng, n: int, c: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """K = 3 adapters: informative, pure noise, anti-informative (prefers a wrong class)."""
    y = rng.integers(0, c, n)
    onehot = np.eye(c)[y]
    good = 1.5 * onehot + rng.normal(0, 1, (n, c))
    noise = rng.normal(0, 3, (n, c))
    anti = -2.0 * onehot + rng.normal(0, 1, (n, c))
    return np.stack([good, noise, anti]), y


def test_fit_weights_beats_uniform_and_stays_nonnegative():
    rng = np.random.default_rng(0)
    z, y = planted_logits(rng, 600)
    a = fit_weights(z, y)
    uniform = np.full(3, 1 / 3)
    assert a.shape == (3,) and np.all(a >= 0)
    assert a[2] < 1e-6  # the anti-informative adapter would want α < 0: projected to 0
    assert a[0] > 5 * a[1]
    assert ensemble_loss(z, y, a) < ensemble_loss(z, y, uniform) - 0.3
    # not just overfitting: it also wins on fresh draws of the same adapters
    z2, y2 = planted_logits(rng, 600)
    assert ensemble_loss(z2, y2, a) < ensemble_loss(z2, y2, uniform) - 0.3
    # logits or log-probs: per-row shifts change nothing
    a_lp = fit_weights(log_softmax(z, axis=-1) - 7.0, y)
    np.testing.assert_allclose(a_lp, a, atol=1e-4)


def test_combine_is_the_weighted_sum():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(1, 5, 4))
    assert np.array_equal(combine(z, np.array([1.0])), z[0])
    z3 = rng.normal(size=(3, 5, 4))
    np.testing.assert_allclose(combine(z3, np.array([0.5, 0.0, 2.0])), 0.5 * z3[0] + 2.0 * z3[2])
    with pytest.raises(ValueError):
        combine(z3, np.ones(2))


def test_fit_all_per_dataset():
    rng = np.random.default_rng(2)
    z, y = planted_logits(rng, 200)
    z2 = rng.normal(size=(2, 50, 2))
    out = fit_all({"a": (z, y), "b": (z2, rng.integers(0, 2, 50))})
    assert out["a"].shape == (3,) and out["b"].shape == (2,)
    assert all(np.all(w >= 0) for w in out.values())


def test_ensemble_json_round_trip(tmp_path):
    e = Ensemble(base_model="tiny", base_fingerprint="abc",
                 adapters=[AdapterSpec("g0", "adapters/g0", ["senti", "claim"]), AdapterSpec("b1", "/abs/b1", ["claim"])],
                 weights={"senti": {"g0": 1.25}, "claim": {"g0": 0.5, "b1": 0.75}},
                 datasets={"senti": DatasetSpec([" positive", " negative"], "Review: {text} Sentiment:", [315, 309]),
                           "claim": DatasetSpec([" true", " false"], "Claim: {text} Verdict:")},
                 meta={"rounds": 1})
    path = e.save(tmp_path / "ens" / "ensemble.json")
    back = Ensemble.load(path)
    assert back.to_dict() == e.to_dict()
    assert json.loads(path.read_text())["weights"]["claim"]["b1"] == 0.75
    assert back.adapter_path("g0") == (tmp_path / "ens" / "adapters" / "g0").resolve()  # relative to the JSON
    assert back.adapter_path("b1") == Path("/abs/b1")
    bad = e.to_dict()
    bad["weights"]["senti"] = {"nope": 1.0}
    with pytest.raises(ValueError, match="unknown adapters"):
        Ensemble.from_dict(bad)
    bad["weights"]["senti"] = {"g0": -1.0}
    with pytest.raises(ValueError, match=">= 0"):
        Ensemble.from_dict(bad)


# ------------------------------------------------------------------------------------------ boosting


def test_ridge_boost_recovers_a_planted_w():
    rng = np.random.default_rng(3)
    G = rng.normal(size=(300, 20))
    w_true = rng.normal(size=20)
    r = G @ w_true + 0.01 * rng.normal(size=300)
    w = ridge_boost(G, r, lam=1e-3)
    assert np.linalg.norm(w - w_true) < 0.02 * np.linalg.norm(w_true)
    # a large λ shrinks toward 0
    assert np.linalg.norm(ridge_boost(G, r, lam=1e5)) < 0.1 * np.linalg.norm(w_true)
    # wide G (d > N) goes through the dual: same minimiser as the primal normal equations
    Gw, rw = rng.normal(size=(15, 60)), rng.normal(size=15)
    primal = np.linalg.solve(Gw.T @ Gw + 0.5 * np.eye(60), Gw.T @ rw)
    np.testing.assert_allclose(ridge_boost(Gw, rw, lam=0.5), primal, atol=1e-10)
    # an integer sample weight == repeating the row
    s = np.ones(300)
    s[:10] = 3
    rep = np.concatenate([G, G[:10], G[:10]]), np.concatenate([r, r[:10], r[:10]])
    np.testing.assert_allclose(ridge_boost(G, r, 2.0, sample_weight=s), ridge_boost(*rep, 2.0), atol=1e-10)


def test_negative_gradient():
    m = np.array([-3.0, 0.0, 2.0])
    eps = 1e-6
    num = -(np.log1p(np.exp(-(m + eps))) - np.log1p(np.exp(-(m - eps)))) / (2 * eps)
    np.testing.assert_allclose(negative_gradient(m), num, atol=1e-6)


def test_keep_round():
    assert keep_round(1.0, 0.9, min_gain=0.05)
    assert not keep_round(1.0, 0.97, min_gain=0.05)
    assert not keep_round(1.0, 1.0)  # no gain, no round
    assert not keep_round(1.0, 1.2)
    assert not keep_round(1.0, float("nan"))
    assert keep_round(float("inf"), 2.0)  # the first round always beats "nothing yet"


class RankTwoDelta:
    """A projection whose Pw is a full ΔW = w0·u1v1ᵀ + w1·u2v2ᵀ on one base module."""

    def __init__(self, module: str, out_dim: int, in_dim: int):
        g = torch.Generator().manual_seed(0)
        self.module, self.u, self.v = module, torch.randn(out_dim, 2, generator=g), torch.randn(in_dim, 2, generator=g)

    def unproject(self, w):
        w = torch.as_tensor(w, dtype=torch.float32)
        return {self.module: (self.u * w) @ self.v.T}


def test_boost_full_delta_writes_an_equivalent_lora(tiny, tmp_path):
    model, tok = tiny
    proj = RankTwoDelta("model.layers.1.self_attn.o_proj", 64, 64)
    w = np.array([0.3, -0.2])
    out = boost_adapter_from_w(None, proj, w, tmp_path / "boost", r=4)
    enc = encode(tok, ["Review: it was wonderful. Sentiment:", "Claim: fire. Verdict:"], 32)
    labels = torch.tensor(label_token_ids(tok, [" positive", " negative", " true"]))
    with torch.no_grad():
        merged = load_base_model("tiny")[0]
        merged.model.layers[1].self_attn.o_proj.weight += proj.unproject(w)["model.layers.1.self_attn.o_proj"]
        want = label_logits(merged, enc["input_ids"], enc["attention_mask"], labels)
        pm = PeftModel.from_pretrained(model, str(out))
        got = label_logits(pm, enc["input_ids"], enc["attention_mask"], labels)
        n_lora = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A"))
        pm.unload()
        base = label_logits(model, enc["input_ids"], enc["attention_mask"], labels)
    assert n_lora == 1  # only the module that was given a delta
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - base).abs().max() > 1e-3


def boosted_pair(model, tok, root: Path, *, scale: float = 3.0, seed: int = 4, names: tuple[str, str] = ("a", "b"),
                 ) -> tuple[Path, Path, Path, Projection]:
    """θ0 (fresh LoRA) and two adapters θ0 + P w_i (w_i ~ scale · N(0, 1)) written by boost_adapter_from_w with the
    real Projection."""
    fresh = save_fresh_adapter((model, tok), TrainConfig(r=4, alpha=8, seed=11), root / "fresh")
    pm = load_adapter(model, fresh)
    proj = Projection.for_model(pm, d=16, seed=0)
    pm.unload()
    rng = np.random.default_rng(seed)
    a, b = (boost_adapter_from_w(fresh, proj, scale * rng.normal(size=16), root / n) for n in names)
    return fresh, a, b, proj


def test_boost_from_fresh_lora_moves_only_b(tiny, tmp_path):
    model, tok = tiny
    fresh, a, _, proj = boosted_pair(model, tok, tmp_path)
    w = 3 * np.random.default_rng(4).normal(size=16)
    s0, s1 = load_file(fresh / "adapter_model.safetensors"), load_file(a / "adapter_model.safetensors")
    delta = proj.unproject(w)
    assert s0.keys() == s1.keys() and all(k.endswith("lora_B") for k in delta)
    for k in s0:
        canon = k.removeprefix("base_model.model.").removesuffix(".weight")
        if "lora_A" in k:
            assert torch.equal(s1[k], s0[k])
        else:
            torch.testing.assert_close(s1[k], s0[k] + delta[canon])
            assert s1[k].abs().sum() > 0
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((fresh / "adapter_config.json").read_text())


# ------------------------------------------------------------------------------------------- predict


def test_predict_combines_adapters_with_the_dataset_weights(tiny, tmp_path):
    model, tok = tiny
    _, a, b, _ = boosted_pair(model, tok, tmp_path / "adapters")
    senti_words, claim_words = [" positive", " negative"], [" true", " false", " neither"]
    ens = Ensemble(
        base_model="tiny", base_fingerprint=model_fingerprint(model),
        adapters=[AdapterSpec("a.0", "adapters/a", ["senti"]), AdapterSpec("b", "adapters/b", ["claim"])],
        weights={"senti": weights_for(["a.0", "b"], np.array([0.7, 1.3])), "claim": {"a.0": 1.0, "b": 0.0}},
        datasets={"senti": DatasetSpec(senti_words, "Review: {text} Sentiment:"),
                  "claim": DatasetSpec(claim_words, "Claim: {text} Verdict:",
                                       label_token_ids(tok, claim_words))})
    ens = Ensemble.load(ens.save(tmp_path / "ensemble.json"))
    senti = [f"Review: {w} Sentiment:" for w in ["it was wonderful.", "a boring film.", "the plot!", "ok"]]
    claim = [f"Claim: {w} Verdict:" for w in ["fire", "water boils at sea level", "the moon is cheese"]]

    # reference: each adapter loaded on its own, its log-probs combined by hand
    def alone(path: Path, prompts, words):
        pm = PeftModel.from_pretrained(model, str(path))
        lp = predict_logprobs(pm, tok, prompts, label_token_ids(tok, words))
        pm.unload()
        return lp

    ref_senti = softmax(0.7 * alone(a, senti, senti_words) + 1.3 * alone(b, senti, senti_words), axis=-1)
    ref_claim = softmax(alone(a, claim, claim_words), axis=-1)
    assert np.abs(ref_senti - softmax(alone(a, senti, senti_words), axis=-1)).max() > 1e-4  # b matters

    try:
        labels, probs = predict(ens, model, tok, "senti", senti)
        np.testing.assert_allclose(probs, ref_senti, atol=1e-5)
        assert np.array_equal(labels, ref_senti.argmax(-1)) and probs.shape == (4, 2)
        labels, probs = predict(ens, model, tok, "claim", claim)
        np.testing.assert_allclose(probs, ref_claim, atol=1e-5)
        assert probs.shape == (3, 3)
        # cached: a second call loads nothing new and gives the same answer
        pm = loaded_model(model, {})
        assert len(pm.peft_config) == 2
        _, again = predict(ens, model, tok, "senti", senti)
        assert len(loaded_model(model, {}).peft_config) == 2 and loaded_model(model, {}) is pm
        np.testing.assert_allclose(again, ref_senti, atol=1e-5)
        with pytest.raises(KeyError):
            predict(ens, model, tok, "nope", senti)
    finally:
        release(model)
    assert not has_lora(model) and model_fingerprint(model) == ens.base_fingerprint
    other, tok2 = load_base_model("tiny")
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="fingerprint"):
        predict(ens, other, tok2, "senti", senti)


# ---------------------------------------------------------------------- the ACL ensemble and boosting


def test_weights_never_all_zero_and_fall_back_to_the_group_adapter():
    """The strategyqa case: candidates with no signal on the weights fold fit to α = 0 (a uniform guess beats
    them); the ensemble must then be the group adapter, not a constant prediction."""
    rng = np.random.default_rng(0)
    half = rng.normal(0, 2, (2, 20, 2))
    noise = np.concatenate([half, half], axis=1)  # every input twice, once with each label: no signal at all
    y = np.array([0] * 20 + [1] * 20)
    assert not (fit_weights(noise, y) > 0).any()  # the degenerate fit does happen
    alpha, fell_back = fit_dataset_weights(noise, y, init=np.array([1.0, 0.5]))
    assert fell_back and alpha.tolist() == [1.0, 0.0]
    for seed in range(20):  # never all zero, signal or not
        z, yy = planted_logits(np.random.default_rng(seed), 30, c=2)
        a, _ = fit_dataset_weights(z * rng.choice([-1.0, 0.0, 1.0]), yy)
        assert (a > 0).any()
    # score_dataset: the fallback ensemble predicts exactly what the group adapter predicts
    yt = rng.integers(0, 2, 25)
    n = len(y)
    group = {"weights": noise[0], "test": rng.normal(0, 1, (25, 2))}
    rnd = [{"weights": noise[1], "test": rng.normal(0, 1, (25, 2))}]
    out = score_dataset(group, rnd, 0.5, {"weights": y, "test": yt})
    assert out["fallback"] and out["weights"] == [1.0, 0.0]
    assert out["accuracy"]["ensemble"] == out["accuracy"]["grouped"]


def test_score_dataset_methods_and_the_all_adapter_option():
    rng = np.random.default_rng(1)
    z, y = planted_logits(rng, 200, c=3)  # informative, noise, anti
    split = {"weights": slice(0, 100), "test": slice(100, 200)}
    labels = {sp: y[s] for sp, s in split.items()}
    group = {sp: z[1][s] for sp, s in split.items()}  # a useless group adapter...
    rounds = [{sp: z[0][s] for sp, s in split.items()}]  # ...and a round that carries the signal
    all_ = {sp: z[2][s] for sp, s in split.items()}
    out = score_dataset(group, rounds, 0.5, labels, all_adapter=all_, include_all=True)
    acc = out["accuracy"]
    assert set(acc) == {"grouped", "grouped_boosted", "ensemble", "one_adapter_all", "ensemble_with_all"}
    want = float((combine(np.stack([group["test"], rounds[0]["test"]]), np.array([1.0, 0.5])).argmax(-1)
                  == labels["test"]).mean())
    assert acc["grouped_boosted"] == want  # F = z_g + η h
    assert acc["ensemble"] > acc["grouped"] + 0.2  # the weights find the round
    assert out["weights"][1] > out["weights"][0] and len(out["weights_with_all"]) == 3
    assert "ensemble_with_all" not in score_dataset(group, rounds, 0.5, labels, all_adapter=all_)["accuracy"]
    with pytest.raises(ValueError, match="include_all"):
        score_dataset(group, rounds, 0.5, labels, include_all=True)


def test_line_search_finds_the_loss_minimizing_multiplier():
    rng = np.random.default_rng(2)
    y = {"a": rng.integers(0, 2, 200)}
    F = {"a": np.zeros((200, 2))}
    h = {"a": 0.1 * (np.eye(2)[y["a"]] - 0.5) + 0.05 * rng.normal(size=(200, 2))}  # right direction, far too small
    rho = line_search(F, h, y)
    grid = np.linspace(0, 20, 2001)
    best = grid[np.argmin([pooled_loss({"a": F["a"] + r * h["a"]}, y)[0] for r in grid])]
    assert rho > 1 and abs(rho - best) < 0.02
    assert line_search(F, {"a": -h["a"]}, y) < 1e-3  # a learner that only hurts gets ρ = 0
    assert boosted_logits(np.zeros((1, 2)), [np.ones((1, 2)), np.ones((1, 2))], [0.5, 2.0]).tolist() == [[2.5, 2.5]]


def test_the_trust_region_check_scores_a_few_leading_rows_of_every_member():
    from grouplora.ml.boosting import _head_counts
    assert _head_counts({"a": 100, "b": 30}, 64) == {"a": 32, "b": 30}  # spread evenly, none over its size
    assert _head_counts({"a": 10, "b": 20}, 64) == {"a": 10, "b": 20}  # fewer rows than asked: all of them
    assert _head_counts({"a": 100, "b": 100}, 0) == {"a": 100, "b": 100}  # 0 = every row
    assert all(v >= 1 for v in _head_counts({f"d{i}": 5 for i in range(100)}, 64).values())


def test_gold_margins_and_pooled_loss():
    z = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = np.array([0, 2])
    p = softmax(z, axis=-1)[np.arange(2), y]
    np.testing.assert_allclose(gold_margins(z, y), np.log(p / (1 - p)), atol=1e-12)
    loss, acc = pooled_loss({"a": z[:1], "b": z[1:]}, {"a": y[:1], "b": y[1:]})
    np.testing.assert_allclose(loss, -np.log(p).mean())
    assert acc == 0.5  # row 2 is a 3-way tie: argmax picks class 0


def group_setup(model, tok, root: Path, d: int = 16):
    """A group of two tiny keyword datasets, its adapter (trained briefly), θ0 = a fresh LoRA, its projection
    and the train features at θ0; validation split into selection and weights folds."""
    senti = tuple(label_token_ids(tok, [" positive", " negative"]))
    claim = tuple(label_token_ids(tok, [" true", " false"]))
    def ds(word0, word1, lab, n, off):
        return [TrainExample(f"Text {i + off}: it was {[word0, word1][i % 2]} today. Answer:", i % 2, lab)
                for i in range(n)]
    train = {"senti": ds("wonderful", "boring", senti, 16, 0), "claim": ds("water", "cheese", claim, 16, 0)}
    val = {"senti": ds("wonderful", "boring", senti, 12, 100), "claim": ds("water", "cheese", claim, 12, 100)}
    select, weights = {}, {}
    for n, ex in val.items():
        select[n], weights[n] = split_validation(ex, [e.label_index for e in ex], seed=0)
    cfg = TrainConfig(r=4, alpha=8, lr=2e-2, epochs=2, batch_size=8, seed=3)
    train_adapter((model, tok), [e for n in train for e in train[n]], cfg, root / "group",
                  val_examples=[e for n in select for e in select[n]])
    theta0 = save_fresh_adapter((model, tok), cfg, root / "theta0")
    pm = load_adapter(model, theta0)
    proj = Projection.for_model(pm, d=d, seed=0)
    feats = {n: compute_features(pm, tok, [e.prompt for e in ex], [e.label_index for e in ex], list(ex[0].label_ids),
                                 proj)[1] for n, ex in train.items()}
    pm.unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return train, select, weights, cfg, RidgeBase(theta0, proj, feats, r=4)


def test_boosting_rounds_are_judged_on_the_selection_fold_only(tiny, tmp_path):
    model, tok = tiny
    train, select, weights, cfg, ridge = group_setup(model, tok, tmp_path)
    # folds are disjoint: the weights fold never judged a round
    for n in select:
        assert not {e.prompt for e in select[n]} & {e.prompt for e in weights[n]}
    st = BoostSettings(mode="ridge", rounds=3, eta=0.5, threshold=0.0, ridge_lam=0.1)
    res = boost_group(model, tok, "g", tmp_path / "group", train, select, st, tmp_path / "boost", ridge=ridge,
                      log=lambda *_: None)
    assert res.rounds and not has_lora(model)
    # every recorded decision is the pooled loss on the SELECTION fold of F = z_g + η Σ h
    z_sel = logprobs_by_dataset(model, tok, tmp_path / "group", select)
    y_sel = {n: np.array([e.label_index for e in ex]) for n, ex in select.items()}
    hs = round_logits(model, tok, res, select)
    assert len(hs) == len(res.kept)
    F = dict(z_sel)
    for k, r in enumerate(res.rounds):
        assert r.loss_before == pytest.approx(pooled_loss(F, y_sel)[0], abs=1e-6)
        if r.kept:
            F = {n: F[n] + 0.5 * r.rho * hs[k][n] for n in F}  # η ρ_r h_r
            assert r.loss_after == pytest.approx(pooled_loss(F, y_sel)[0], abs=1e-5)
            assert r.loss_after < r.loss_before
        else:
            assert r is res.rounds[-1] and r.loss_after >= r.loss_before  # the first rejection ends it
    assert len(res.rounds) <= 3 and res.step_sizes == [0.5 * r.rho for r in res.kept]
    assert [r.index for r in res.rounds] == list(range(1, len(res.rounds) + 1))  # rounds numbered 1..R, in order
    assert all(Path(r.adapter_dir).name == f"round_{r.index}" for r in res.rounds)
    assert all(r.rho >= 0 for r in res.rounds)
    # each ridge round's step was shrunk into the linear regime: its real Δf on train is within tolerance of Gw
    assert all(r.linearity_error <= st.linear_tol for r in res.rounds)
    # a threshold above the group's held-out loss: no round at all
    high = boost_group(model, tok, "g", tmp_path / "group", train, select,
                       BoostSettings(threshold=10.0), tmp_path / "boost2", ridge=ridge, log=lambda *_: None)
    assert high.rounds == [] and "threshold" in high.stop


def test_trained_boosting_fits_the_residual_with_offsets(tiny, tmp_path):
    model, tok = tiny
    train, select, _, cfg, _ = group_setup(model, tok, tmp_path)
    st = BoostSettings(mode="trained", rounds=1, eta=1.0, threshold=0.0, train_epochs=1)
    res = boost_group(model, tok, "g", tmp_path / "group", train, select, st, tmp_path / "boost", config=cfg,
                      log=lambda *_: None)
    (r,) = res.rounds
    assert r.flops > 0 and r.steps == 4 and res.reference is None and not has_lora(model)
    # its validation scores include the offsets: not the round adapter's own, so not kept for reuse
    assert not (Path(r.adapter_dir) / VAL_LOGPROBS).exists() and (tmp_path / "group" / VAL_LOGPROBS).exists()
    assert res.to_dict() == BoostResult.from_dict(res.to_dict()).to_dict()


def test_constant_logit_offsets_change_nothing(tiny, tmp_path):
    """Offsets shift each example's logits; a per-row constant is softmax-invariant, so training is identical."""
    model, tok = tiny
    lab = label_token_ids(tok, [" yes", " no"])
    ex = [TrainExample(f"Question: is it {w}? Answer:", i % 2, lab) for i, w in enumerate(["blue", "cold"] * 4)]
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2)
    train_adapter((model, tok), ex, cfg, tmp_path / "plain")
    train_adapter((model, tok), ex, cfg, tmp_path / "shift", logit_offsets=[[3.0, 3.0]] * len(ex))
    train_adapter((model, tok), ex, cfg, tmp_path / "tilt", logit_offsets=[[3.0, -3.0]] * len(ex))
    a, b, c = (load_file(tmp_path / x / "adapter_model.safetensors") for x in ("plain", "shift", "tilt"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=0)  # float32 rounding of the shifted logits
    assert any((a[k] - c[k]).abs().max() > 1e-3 for k in a)
    with pytest.raises(ValueError, match="offsets"):
        train_adapter((model, tok), ex, cfg, tmp_path / "bad", logit_offsets=[[1.0, 2.0]])


def test_predict_takes_boosting_rounds_against_their_reference(tiny, tmp_path):
    """A round contributes z(round) − z(reference): against the bare base, or against θ0 (another adapter)."""
    model, tok = tiny
    fresh, a, b, _ = boosted_pair(model, tok, tmp_path / "adapters")
    words = [" positive", " negative"]
    ens = Ensemble(base_model="tiny", base_fingerprint="",
                   adapters=[AdapterSpec("g", str(a)), AdapterSpec("r1", str(b), reference="theta0"),
                             AdapterSpec("theta0", str(fresh)), AdapterSpec("r2", str(b), reference="base")],
                   weights={"senti": {"g": 1.0, "r1": 0.5, "r2": 0.25}}, datasets={"senti": DatasetSpec(words)})
    prompts = ["Review: it was wonderful. Sentiment:", "Review: a boring film. Sentiment:"]
    ids = label_token_ids(tok, words)

    def alone(path):
        if path is None:
            return predict_logprobs(model, tok, prompts, ids)
        pm = PeftModel.from_pretrained(model, str(path))
        lp = predict_logprobs(pm, tok, prompts, ids)
        pm.unload()
        return lp

    za, zb, z0, zbase = alone(a), alone(b), alone(fresh), alone(None)
    try:
        _, probs = predict(ens, model, tok, "senti", prompts)
        want = softmax(za + 0.5 * (zb - z0) + 0.25 * (zb - zbase), axis=-1)
        np.testing.assert_allclose(probs, want, atol=1e-5)
    finally:
        release(model)
    with pytest.raises(ValueError, match="reference"):
        Ensemble.from_dict({**ens.to_dict(), "adapters": [{"name": "x", "path": "p", "reference": "nope"}],
                            "weights": {}})


def test_merged_ensemble_with_rounds_matches_it_to_first_order(tiny, tmp_path):
    """Served as one merged adapter, an ensemble with a boosting round must carry the round's Δ minus its
    reference's and the anchors' temperature (ml.ensemble.merge_weights); the plain α/Σα merge over-weights the
    base logits by the rounds' α."""
    from grouplora.ml.ensemble import _peft_name, merge_weights, merged_logprobs
    from grouplora.ml.inference import merge_adapters

    model, tok = tiny
    root = tmp_path / "adapters"
    # g, and t: a reference with B ≠ 0
    fresh, g, t, proj = boosted_pair(model, tok, root, scale=0.02, seed=7, names=("g", "t"))
    rng = np.random.default_rng(8)
    r = boost_adapter_from_w(t, proj, 0.02 * rng.normal(size=16), root / "r")  # a round started at t
    words = [" positive", " negative"]
    alpha = {"g": 1.2, "r": 0.9}
    ens = Ensemble(base_model="tiny", base_fingerprint="",
                   adapters=[AdapterSpec("g", str(g)), AdapterSpec("r", str(r), reference="t"),
                             AdapterSpec("t", str(t))],
                   weights={"senti": alpha}, datasets={"senti": DatasetSpec(words)})
    mw, temp = merge_weights(ens, alpha)
    assert temp == pytest.approx(1.2) and mw == pytest.approx({"g": 1.0, "r": 0.75, "t": -0.75})
    prompts = [f"Review: {x}. Sentiment:" for x in ("it was wonderful", "a boring film", "fine, I guess", "awful")]
    try:
        _, exact = predict(ens, model, tok, "senti", prompts)
        merged = np.exp(merged_logprobs(ens, model, tok, "senti", prompts))
        pm = loaded_model(model, {n: ens.adapter_path(n) for n in alpha})
        key, total = merge_adapters(pm, {_peft_name(n, ens.adapter_path(n)): a for n, a in alpha.items()})
        pm.set_adapter(key)
        naive = softmax(total * predict_logprobs(pm, tok, prompts, label_token_ids(tok, words)), axis=-1)
    finally:
        release(model)
    # small deltas (the first-order regime; the tiny random model is far from linear at larger ones): the error
    # of the merge is second order (measured 0.007 in log-odds), the plain merge's first order (0.27)
    log_odds = lambda p: np.log(p[:, 0] / p[:, 1])  # noqa: E731
    err, naive_err = (np.abs(log_odds(m) - log_odds(exact)).max() for m in (merged, naive))
    assert err < 0.1 * naive_err, (err, naive_err)


# ------------------------------------------------------------------------------------ work not done twice


def counting(monkeypatch, module, name: str) -> list:
    """Wrap module.name (a scoring function, called for real) to record what each call scored (prompts in all
    for {dataset: log-probs}, else the output's shape): the test counts the forward work, the numbers come from
    the real function."""
    calls: list = []
    real = getattr(module, name)

    def wrapper(*args, **kw):
        out = real(*args, **kw)
        calls.append(sum(len(v) for v in out.values()) if isinstance(out, dict) else np.shape(out))
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_boosting_with_given_reference_logprobs_scores_less_and_decides_the_same(tiny, tmp_path, monkeypatch):
    """θ0's log-probs passed in (e.g. the stored zero-shot scores) replace scoring θ0 on train and the selection
    fold; the accepted round's h on train reuses the trust-region check's rows. Same rounds, same decisions."""
    import grouplora.ml.boosting as boosting

    model, tok = tiny
    train, select, _, _, ridge = group_setup(model, tok, tmp_path)
    st = BoostSettings(mode="ridge", rounds=2, eta=0.5, threshold=0.0, ridge_lam=0.1, check_examples=8)
    plain = boost_group(model, tok, "g", tmp_path / "group", train, select, st, tmp_path / "b1", ridge=ridge,
                        log=lambda *_: None)
    ref = (logprobs_by_dataset(model, tok, ridge.theta0_dir, train), logprobs_by_dataset(model, tok, ridge.theta0_dir,
                                                                                         select))
    scored = counting(monkeypatch, boosting, "logprobs_by_dataset")
    given = boost_group(model, tok, "g", tmp_path / "group", train, select, st, tmp_path / "b2", ridge=ridge,
                        reference_logprobs=ref, log=lambda *_: None)
    assert plain.rounds
    assert [(r.kept, r.index) for r in given.rounds] == [(r.kept, r.index) for r in plain.rounds]
    for a, b in zip(plain.rounds, given.rounds):
        assert b.loss_after == pytest.approx(a.loss_after, abs=1e-5) and b.rho == pytest.approx(a.rho, rel=1e-3)
    n_tr, n_sel = sum(map(len, train.values())), sum(map(len, select.values()))
    # group adapter on train + select, then per round: the checks (8 rows each), the rest of train, select
    tries = [c for c in scored[2:] if c == 8]
    assert sum(scored) == n_tr + n_sel + len(tries) * 8 + len(given.rounds) * (n_tr - 8 + n_sel)
    with pytest.raises(ValueError, match="shape"):
        boost_group(model, tok, "g", tmp_path / "group", train, select, st, tmp_path / "b3", ridge=ridge,
                    reference_logprobs=({n: z[:-1] for n, z in ref[0].items()}, ref[1]), log=lambda *_: None)


def test_merged_column_of_a_single_adapter_reuses_its_scores(tiny, tmp_path, monkeypatch):
    """When the served weights keep one adapter, the merged adapter IS that adapter: its log-probs from the
    ensemble's pass give the merged column with no second pass, equal to scoring it again."""
    import grouplora.ml.ensemble as ensemble_mod
    from grouplora.ml.ensemble import adapter_logprobs, merged_logprobs

    model, tok = tiny
    _, a, b, _ = boosted_pair(model, tok, tmp_path / "adapters")
    words = [" positive", " negative"]
    ens = Ensemble(base_model="tiny", base_fingerprint="",
                   adapters=[AdapterSpec("g", str(a)), AdapterSpec("all", str(b))], weights={},
                   datasets={"senti": DatasetSpec(words)})
    prompts = ["Review: it was wonderful. Sentiment:", "Review: a boring film. Sentiment:", "Review: fine. Sentiment:"]
    try:
        z = adapter_logprobs(ens, model, tok, "senti", prompts, ["g", "all"])
        again = merged_logprobs(ens, model, tok, "senti", prompts, weights={"g": 2.5})
        calls = counting(monkeypatch, ensemble_mod, "predict_logprobs")
        reused = merged_logprobs(ens, model, tok, "senti", prompts, weights={"g": 2.5}, scored={"g": z[0], "all": z[1]})
        assert calls == []  # no pass
        np.testing.assert_allclose(reused, again, atol=1e-5)
        np.testing.assert_array_equal(reused.argmax(-1), again.argmax(-1))
        # two adapters with α > 0: a real merge, scored
        merged_logprobs(ens, model, tok, "senti", prompts, weights={"g": 1.0, "all": 0.5},
                        scored={"g": z[0], "all": z[1]})
        assert calls == [(len(prompts), 2)]
    finally:
        release(model)


def test_given_reference_logprobs_are_not_scored_again(tiny, tmp_path, monkeypatch):
    """A round's reference given (the stored zero-shot scores of θ0 / the base) drops it from the pass; the
    round's contribution z(round) − z(reference) is the same."""
    import grouplora.ml.inference as inference
    from grouplora.ml.ensemble import adapter_logprobs

    model, tok = tiny
    fresh, a, b, _ = boosted_pair(model, tok, tmp_path / "adapters")
    words = [" positive", " negative"]
    ens = Ensemble(base_model="tiny", base_fingerprint="",
                   adapters=[AdapterSpec("g", str(a)), AdapterSpec("r1", str(b), reference="theta0"),
                             AdapterSpec("theta0", str(fresh))], weights={}, datasets={"senti": DatasetSpec(words)})
    prompts = ["Review: it was wonderful. Sentiment:", "Review: a boring film. Sentiment:"]
    base = predict_logprobs(model, tok, prompts, label_token_ids(tok, words))  # θ0 = fresh LoRA = the base
    try:
        full = adapter_logprobs(ens, model, tok, "senti", prompts, ["g", "r1"])
        mixed = counting(monkeypatch, inference, "mixed_logprobs")
        given = adapter_logprobs(ens, model, tok, "senti", prompts, ["g", "r1"], given={"theta0": base})
        np.testing.assert_allclose(given, full, atol=1e-5)
        assert mixed == [(2, len(prompts), 2)]  # one pass of two adapters (g, r1) rather than three
        with pytest.raises(ValueError, match="shape"):
            adapter_logprobs(ens, model, tok, "senti", prompts, ["g", "r1"], given={"theta0": base[:1]})
    finally:
        release(model)


def test_a_group_below_the_threshold_never_scores_its_train_examples(tiny, tmp_path, monkeypatch):
    import grouplora.ml.boosting as boosting

    model, tok = tiny
    train, select, _, _, ridge = group_setup(model, tok, tmp_path)
    scored = counting(monkeypatch, boosting, "logprobs_by_dataset")
    res = boost_group(model, tok, "g", tmp_path / "group", train, select, BoostSettings(threshold=10.0),
                      tmp_path / "boost", ridge=ridge, log=lambda *_: None)
    assert res.rounds == [] and "threshold" in res.stop
    assert scored == [sum(map(len, select.values()))]  # the selection fold only: its loss decides


def test_stored_zero_shot_logprobs_follow_the_rows_of_a_split_or_fold(tmp_path):
    """store.zero_shot_logprobs(name, split) lines the stored scores up with rows(name, split) by example_id,
    whatever order they were written in; a missing example is a clear error."""
    import dagster as dg
    import pandas as pd

    from grouplora.orchestration.store import FOLD_SELECT, FOLD_WEIGHTS, ArtifactStore

    store = ArtifactStore(root=str(tmp_path / "storage"))
    n = 20
    rows = pd.DataFrame({"example_id": [f"e{i}" for i in range(n)], "prompt": [f"p{i}" for i in range(n)],
                         "label_id": [i % 2 for i in range(n)],
                         "split": ["train"] * 6 + ["validation"] * 10 + ["test"] * 4})
    store.write_dataset("d", rows, {"label_words": ["a", "b"]})
    lp = np.stack([np.array([-float(i), -float(i) - 0.5]) for i in range(n)]).astype(np.float32)
    order = np.random.default_rng(0).permutation(n)  # written shuffled
    store.write_zero_shot("d", pd.DataFrame({"example_id": rows["example_id"].to_numpy()[order],
                                             "logprobs": list(lp[order])}))
    for split in ("train", "test", FOLD_SELECT, FOLD_WEIGHTS):
        want = lp[[int(e[1:]) for e in store.rows("d", split)["example_id"]]]
        np.testing.assert_array_equal(store.zero_shot_logprobs("d", split), want)
    assert len(store.zero_shot_logprobs("d", FOLD_SELECT)) + len(store.zero_shot_logprobs("d", FOLD_WEIGHTS)) == 10
    store.write_zero_shot("d", pd.DataFrame({"example_id": ["e0"], "logprobs": [lp[0]]}))
    with pytest.raises(dg.Failure, match="re-materialize zero_shot_scores"):
        store.zero_shot_logprobs("d", "test")


def test_the_group_adapters_own_selection_scores_replace_a_pass(tiny, tmp_path, monkeypatch):
    """Training kept the best epoch's log-probs on the selection fold beside the adapter; boosting's held-out
    loss reads them (equal to scoring the saved adapter again) and scores nothing; other examples get None."""
    import grouplora.ml.boosting as boosting
    from grouplora.assets.ensemble import adapter_select_logprobs

    model, tok = tiny
    train, select, weights, _, ridge = group_setup(model, tok, tmp_path)
    kept = adapter_select_logprobs(tmp_path / "group", select)
    again = logprobs_by_dataset(model, tok, tmp_path / "group", select)
    assert kept is not None and kept.keys() == again.keys()
    for n in again:
        np.testing.assert_allclose(kept[n], again[n], atol=1e-5)
    assert adapter_select_logprobs(tmp_path / "group", weights) is None  # not the examples it was evaluated on
    scored = counting(monkeypatch, boosting, "logprobs_by_dataset")
    res = boost_group(model, tok, "g", tmp_path / "group", train, select, BoostSettings(threshold=10.0),
                      tmp_path / "boost", ridge=ridge, select_logprobs=kept, log=lambda *_: None)
    y = {n: np.array([e.label_index for e in ex]) for n, ex in select.items()}
    assert scored == [] and res.select_loss == pytest.approx(pooled_loss(again, y)[0], abs=1e-5)
