"""The positive control (benchmarks/positive_control.py) on real twin data: label-swapped copies of real datasets.

* The whole chain on the tiny model (fast): every stage runs through the ml/ functions, the results hold together,
  and the invariants of twins hold exactly: a single adapter sees the same prompt in both twins with the answers
  swapped, so ITS accuracies on a twin pair sum to 1 (pair mean 0.5), whatever it learned. A rerun resumes.
* The estimate → affinity (pipeline SQL) → SDP partition part on the real model: twin gradients are exact negatives,
  twins get negative affinity and land in different groups (the tiny random model has no features that generalize
  from train to validation, so it cannot show this). About a minute of CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PAIRS = ["rotten_tomatoes", "amazon_reviews"]


@pytest.fixture(scope="module")
def twins_pack(tmp_path_factory) -> Path:
    """The real twins pack for two sentiment sets (registry archives, cached after the first build)."""
    from grouplora.ml.datapack import build_datapack

    out = tmp_path_factory.mktemp("twins") / "pack"
    build_datapack("twins", out, progress=False, datasets=PAIRS)
    return out


def test_whole_chain_on_the_tiny_model(twins_pack, tmp_path, capsys):
    import positive_control as pc

    args = ["--device", "cpu", "--model", "tiny", "--data", str(twins_pack), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "pc.json"), "--max-train", "16", "--max-val", "16", "--max-test", "24",
            "--seeds", "0", "--epochs", "1", "--batch-size", "8", "--lr", "1e-2", "--n-calibration", "1",
            "--boost-rounds", "2", "--boost-threshold", "0", "--max-length", "96", "--d", "32"]
    res = pc.main(args)
    for key in ("ensemble_minus_all_adapter", "flops_ratio", "twins_separated", "n_datasets", "seeds"):
        assert key in res
    assert res["n_datasets"] == 4 and res["seeds"] == [0] and res["theta0"] == "meta_init"
    # ridge boosting trains nothing, and the groups split the same examples the all-datasets adapter saw
    assert res["flops_ratio"] == pytest.approx(1.0, abs=1e-12)
    m = res["methods_s0"]
    assert m["costs"]["ensemble"]["steps"] == m["costs"]["grouped"]["steps"] > 0
    rows = {r["dataset"]: r for r in m["rows"]}
    for r in rows.values():
        assert any(w > 0 for w in r["weights"]) and len(r["weights"]) == 1 + r["n_rounds"]
        assert all(0 <= v <= 1 for v in r["accuracy"].values())
    # twins: one adapter (or none) answers the same prompt in both, so its pair accuracies sum to exactly 1
    for a, b in res["pairs"]:
        for method in ("zero_shot", "one_adapter_all"):
            assert rows[a]["accuracy"][method] + rows[b]["accuracy"][method] == pytest.approx(1.0)
        if rows[a]["group"] == rows[b]["group"]:
            assert rows[a]["accuracy"]["grouped"] + rows[b]["accuracy"]["grouped"] == pytest.approx(1.0)
    aff = res["affinity_s0"]
    assert sorted(sum(aff["groups"], [])) == sorted(res["datasets"]) and len(aff["twins"]) == 2
    cal = res["calibration_s0"]["calibration"]
    assert cal["theta0"] == "meta_init" and cal["source"] == "calibrated" and aff["lam"] == cal["lam"]
    assert len(cal["table"]) == len(cal["grid"]) and res["calibration_s0"]["flops"] > 0
    runs = m["runs"]
    assert all(1 <= r["best_epoch"] <= r["epochs"] == 1 for r in runs.values())
    assert Path(res["heatmap"]).stat().st_size > 1000
    # a rerun resumes from the work folder: no stage runs again, same numbers; a finished seed needs only its
    # stage files (what a fresh GPU machine gets back), not its adapters
    import shutil
    shutil.rmtree(tmp_path / "work" / "adapters")
    capsys.readouterr()
    again = pc.main(args)
    assert "==" not in capsys.readouterr().out
    assert again["methods_s0"]["rows"] == json.loads(json.dumps(m["rows"]))


def test_real_model_estimates_separate_the_twins(twins_pack, tmp_path):
    """Features at a fresh LoRA of the real model, estimates at a pinned λ, the pipeline's SQL, the SDP partition.
    32 training examples per dataset is about the least at which the estimates generalize (16 is not reliable)."""
    import positive_control as pc

    args = pc.parse_args(["--device", "cpu", "--data", str(twins_pack), "--work", str(tmp_path / "work"),
                          "--max-train", "32", "--max-val", "32", "--max-test", "2", "--theta0", "fresh_lora",
                          "--lam", "0.03", "--max-length", "64", "--feature-batch-size", "8"])
    model, tok = pc.load_base_model(args.model, device="cpu")
    suite = pc.Suite([d for d in pc.load_data(pc.prepare_pack(args), tok, args)[0] if d.name in args.only],
                     args.weights_share, args.seed)
    ch = pc.Chain(model, tok, suite, pc.TrainConfig(max_length=64), args)
    feats, _, _ = ch.features(0)
    # a twin is the same prompt with the two answers swapped: its gold log-odds and their gradient flip sign exactly
    for a, b in pc.twin_pairs(suite.names):
        np.testing.assert_allclose(feats.train[b].f0, -feats.train[a].f0, atol=1e-4)
        np.testing.assert_allclose(feats.train[b].G, -feats.train[a].G, atol=1e-4 * np.abs(feats.train[a].G).max())
    aff = ch.affinity(0, feats, args.lam)
    for t in aff["twins"]:  # the affinity the partition uses (subset_affinity, symmetrized): twins below the mean
        assert t["separated"], aff["groups"]
        assert t["affinity_sym"] < 0 and t["contrast"] < 0, t
    assert aff["twins_separated"]
    # (pairwise_affinity's single pair vs singleton is reported too; at 32 examples the singleton fit overfits, so
    # its sign is not yet reliable: the GPU run's sizes are where it is read)
