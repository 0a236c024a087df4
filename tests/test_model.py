"""Base-model loading and label scoring, on the tiny random Llama (no download) and, marked slow, on SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grouplora.ml.model import label_token_ids, load_base_model, model_fingerprint
from grouplora.ml.scoring import (accuracy, encode, label_logits, length_batches, log_odds, predict_logprobs,
                                  prompt_lengths, shuffled_length_batches, token_batches)

PROMPTS = [
    "Review: the movie was wonderful. Sentiment:",
    "Review: a dull, boring film with a terrible plot and worse acting, honestly. Sentiment:",
    "Question: is the sky blue? Answer:",
    "Claim: fire is cold. Verdict:",
    "Hi. Sentiment:",
    "Email: win a free prize now, click here, click here, you won, it is free. Label:",
    "The quick brown fox jumps over the lazy dog. Sentiment:",
]


def test_tiny_load_is_deterministic_and_fingerprint_stable(tiny):
    model, tok = tiny
    model2, tok2 = load_base_model("tiny")
    assert tok.get_vocab() == tok2.get_vocab()
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    assert model_fingerprint(model) == model_fingerprint(model2)
    assert len(model_fingerprint(model)) == 16
    assert tok.pad_token is not None and tok.padding_side == "right"
    # a changed weight changes the fingerprint
    with torch.no_grad():
        model2.model.layers[1].mlp.down_proj.weight[3, 5] += 1.0
    assert model_fingerprint(model) != model_fingerprint(model2)


def test_label_token_ids(tiny):
    _, tok = tiny
    ids = label_token_ids(tok, [" positive", " negative"])
    assert len(set(ids)) == 2
    assert tok.decode([ids[0]]) == " positive"
    with pytest.raises(ValueError, match=r"' positive' and ' positively'"):
        label_token_ids(tok, [" positive", " negative", " positively"])
    with pytest.raises(ValueError, match="nothing"):
        label_token_ids(tok, [" yes", ""])


def test_encode_truncates_from_the_left(tiny):
    _, tok = tiny
    long = "word " * 200 + "Sentiment:"
    enc = encode(tok, [long, "Hi. Sentiment:"], max_length=16)
    assert enc["input_ids"].shape == (2, 16)
    full = tok(long)["input_ids"]
    assert enc["input_ids"][0].tolist() == full[-16:]  # the end (answer cue) survives
    assert tok.decode(enc["input_ids"][0]).endswith("Sentiment:")
    n = int(enc["attention_mask"][1].sum())
    assert enc["attention_mask"][1, n:].sum() == 0 and (enc["input_ids"][1, n:] == tok.pad_token_id).all()


def test_label_logits_match_full_vocab_logits_with_padding(tiny):
    model, tok = tiny
    lab = torch.tensor(label_token_ids(tok, [" positive", " negative", " yes"]))
    enc = encode(tok, PROMPTS, max_length=64)
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    with torch.no_grad():
        z = label_logits(model, enc["input_ids"], enc["attention_mask"], lab)
        full = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    ref = full[torch.arange(len(PROMPTS)), last][:, lab]
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    # and each row equals that prompt scored alone (pads are invisible)
    one = encode(tok, PROMPTS[1:2], max_length=64)
    with torch.no_grad():
        z1 = label_logits(model, one["input_ids"], one["attention_mask"], lab)
    torch.testing.assert_close(z[1:2], z1, rtol=1e-5, atol=1e-5)


def test_log_odds_is_stable_and_correct():
    z = torch.tensor([[2.0, 0.0, -1.0], [1000.0, -1000.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    f = log_odds(z, y)
    p = torch.softmax(z, -1)[0, 0]
    assert abs(f[0].item() - (torch.log(p) - torch.log1p(-p)).item()) < 1e-12
    assert torch.isfinite(f).all() and abs(f[1].item() - (-2000.0)) < 1e-9


def test_predict_logprobs_is_batch_invariant(tiny):
    model, tok = tiny
    lab = label_token_ids(tok, [" positive", " negative"])
    a = predict_logprobs(model, tok, PROMPTS, lab, batch_size=1, max_length=64)
    b = predict_logprobs(model, tok, PROMPTS, lab, batch_size=7, max_length=64)
    c = predict_logprobs(model, tok, PROMPTS, lab, batch_size=3, max_length=64)
    assert a.shape == (len(PROMPTS), 2)
    np.testing.assert_allclose(np.exp(a).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert len({round(float(r[0]), 4) for r in a}) > 1  # rows differ: order was restored, not one row copied
    assert accuracy(a, a.argmax(1)) == 1.0 and accuracy(a, 1 - a.argmax(1)) == 0.0


def test_length_batches_respect_the_token_budget():
    lengths = [5, 40, 3, 40, 12, 7, 7, 100, 1, 12]
    for batch_size, max_tokens in [(None, 40), (3, None), (4, 60), (None, 1), (None, 10_000)]:
        batches = length_batches(lengths, batch_size, max_tokens=max_tokens)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each index once
        for b in batches:
            padded = len(b) * max(lengths[i] for i in b)
            assert len(b) == 1 or max_tokens is None or padded <= max_tokens
            assert batch_size is None or len(b) <= batch_size
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # a budget packs short examples densely and gives the 100-token one a batch of its own
    batches = length_batches(lengths, max_tokens=100)
    assert batches[0] == [7] and len(batches) == 3
    assert length_batches(lengths, max_tokens=10_000) == [sorted(range(10), key=lambda i: (-lengths[i], i))]
    with pytest.raises(ValueError):
        length_batches(lengths)


def test_token_budget_scoring_equals_one_at_a_time_whatever_the_padding_side(tiny):
    """Batches packed by a token budget mix lengths 3 to 30: padding must not leak into any row; a tokenizer
    that pads on the left (as many HF folders do) must not change anything (we pad right ourselves)."""
    model, tok = tiny
    lab = label_token_ids(tok, [" positive", " negative"])
    prompts = PROMPTS + ["ok", "Review: " + "long and winding, " * 6 + "Sentiment:"]
    lengths = prompt_lengths(tok, prompts, 64)
    assert max(lengths) > 5 * min(lengths)
    one = predict_logprobs(model, tok, prompts, lab, batch_size=1, max_length=64)
    for budget in (8, 64, 200, 10_000):
        packed = predict_logprobs(model, tok, prompts, lab, batch_size=None, max_tokens=budget, max_length=64)
        np.testing.assert_allclose(packed, one, atol=1e-5)
    assert any(len(idx) > 2 for idx, _ in token_batches(tok, prompts, 64, max_tokens=200))  # really batched
    tok.padding_side = "left"
    try:
        left = predict_logprobs(model, tok, prompts, lab, batch_size=None, max_tokens=200, max_length=64)
        enc = encode(tok, prompts[:2], 64)
    finally:
        tok.padding_side = "right"
    np.testing.assert_allclose(left, one, atol=1e-5)
    assert enc["attention_mask"][:, 0].all()  # right-padded: every row starts with a real token


def test_shuffled_length_batches_keep_batch_size_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=203).tolist()
    plain = shuffled_length_batches(lengths, 8, [0, 0], window=1)
    grouped = shuffled_length_batches(lengths, 8, [0, 0], window=8)
    for batches in (plain, grouped):
        assert sorted(i for b in batches for i in b) == list(range(203))
        assert len(batches) == -(-203 // 8) and [len(b) for b in batches[:-1]] == [8] * 25 and len(batches[-1]) == 3
    assert grouped == shuffled_length_batches(lengths, 8, [0, 0], window=8)  # seeded: same order on resume
    assert grouped != shuffled_length_batches(lengths, 8, [0, 1], window=8)  # another epoch, another order

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.8 * padded(plain)
    # still shuffled: the batches do not come longest first
    firsts = [max(lengths[i] for i in b) for b in grouped[:-1]]
    assert firsts != sorted(firsts, reverse=True)


def _bnb_cpu_works() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _bnb_cpu_works(), reason="bitsandbytes not importable")
def test_tiny_4bit_forward_backward(tmp_path):
    import bitsandbytes as bnb
    model, tok = load_base_model("tiny", load_in_4bit=True, cache_dir=tmp_path)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    lab = torch.tensor(label_token_ids(tok, [" positive", " negative"]))
    enc = encode(tok, PROMPTS[:3], max_length=32)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)  # the 4-bit weights are frozen: take a gradient through them to the embeddings
    f = log_odds(label_logits(model, enc["input_ids"], enc["attention_mask"], lab), torch.tensor([0, 1, 0]))
    f.sum().backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    # 4-bit is close to, but not equal to, the fp32 model
    ref, _ = load_base_model("tiny")
    with torch.no_grad():
        z4 = label_logits(model, enc["input_ids"], enc["attention_mask"], lab)
        z32 = label_logits(ref, enc["input_ids"], enc["attention_mask"], lab)
    assert not torch.equal(z4, z32) and (z4 - z32).abs().max() < 0.5


@pytest.mark.slow
def test_smollm2_real_model():
    import time
    t0 = time.time()
    model, tok = load_base_model("smollm2-135m-instruct")
    print(f"\nSmolLM2 load {time.time() - t0:.1f}s, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
    lab = label_token_ids(tok, [" positive", " negative"])
    prompts = ["Review: An absolute masterpiece, moving and brilliantly acted. I loved every minute.\nSentiment:",
               "Review: A boring, awful mess. The worst film I have seen this year.\nSentiment:"]
    lp = predict_logprobs(model, tok, prompts, lab, batch_size=2)
    # seen: [[-0.07, -2.67], [-2.39, -0.10]]
    assert lp[0, 0] > np.log(0.8) and lp[1, 1] > np.log(0.8)
    f = log_odds(torch.from_numpy(lp), torch.tensor([0, 1]))
    assert (f > 1.0).all()


def test_default_token_budget_by_device():
    from grouplora.ml.scoring import MAX_TOKENS, default_max_tokens
    assert default_max_tokens("cpu") == MAX_TOKENS["cpu"]
    assert default_max_tokens("cuda:1") == default_max_tokens(torch.device("cuda")) == MAX_TOKENS["cuda"]
    assert MAX_TOKENS["cuda"] > MAX_TOKENS["cpu"]
