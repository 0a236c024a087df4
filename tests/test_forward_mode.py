"""Forward mode: θ0 + Pw in the real (tiny) model agrees with the linearized estimate for small w, and the
LoRA weights are restored exactly afterwards."""

import numpy as np
import torch

from grouplora.ml.features import compute_features
from grouplora.ml.forward_mode import forward_scores, log_odds_from_logprobs, shifted_lora
from grouplora.ml.lora import add_lora, lora_weights
from grouplora.ml.model import label_token_ids, load_base_model
from grouplora.ml.projection import Projection
from grouplora.ml.scoring import predict_logprobs


def test_forward_mode_matches_linearization_for_small_w_and_restores_weights():
    torch.manual_seed(0)
    model, tok = load_base_model("tiny")
    model = add_lora(model, seed=1)
    proj = Projection.for_model(model, d=40, seed=3)
    prompts = [f"the movie was {w} {i}\nAnswer:" for i, w in enumerate(["good", "bad", "fine", "awful", "great"])]
    labels = [0, 1, 0, 1, 0]
    ids = label_token_ids(tok, [" positive", " negative"])
    f0, G = compute_features(model, tok, prompts, labels, ids, proj, batch_size=2)
    before = {n: p.detach().clone() for n, p in lora_weights(model).items()}

    w = np.random.default_rng(0).normal(size=40) * 1e-2 / np.linalg.norm(G, axis=1).mean()
    with shifted_lora(model, proj, w):
        f1 = log_odds_from_logprobs(predict_logprobs(model, tok, prompts, ids), np.array(labels))
    lin = f0 + G @ w
    assert np.abs(f1 - f0).max() > 1e-5, "the shift must move f"
    assert np.abs(f1 - lin).max() < 0.05 * np.abs(f1 - f0).max() + 1e-6  # first order holds for small w
    for n, p in lora_weights(model).items():
        assert torch.equal(p, before[n]), n

    out = forward_scores(model, tok, proj, w, prompts, labels, ids)
    assert np.isclose(out["est_margin"], f1.mean(), atol=1e-5)
    assert np.isclose(out["est_loss"], np.logaddexp(0, -f1).mean(), atol=1e-5)
