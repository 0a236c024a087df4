"""λ calibration against (stand-in) real fine-tunes, and the validation folds that keep choices apart.

The synthetic case has a known answer: the "real" results are the exact estimates at a planted λ* (plus a little
noise), so the estimator's error is smallest at λ* and calibration must pick it."""

from __future__ import annotations

import numpy as np
import pytest

from grouplora.ml.calibration import (Calibration, calibrate, calibration_subsets, choose_lam, error_table,
                                      member_estimates)
from grouplora.ml.estimation import synthetic_features
from grouplora.ml.folds import split_validation, weights_fold_mask
from grouplora.ml.subsets import Subset

GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 1.0)


def planted_truth(fs, subsets, lam_true: float, noise: float = 0.0, seed: int = 0) -> dict:
    est, _, _ = member_estimates(fs, subsets, lam_true)
    rng = np.random.default_rng(seed)
    return {sid: {r.dataset: {"loss": float(r.est_loss) * (1 + noise * rng.standard_normal()),
                              "accuracy": float(r.est_accuracy)} for r in g.itertuples()}
            for sid, g in est.groupby("subset_id")}


@pytest.mark.parametrize("lam_true", [1e-3, 3e-2, 1e-1])
def test_calibration_picks_the_planted_lambda(lam_true):
    fs = synthetic_features(n_datasets=6, n_train=120, n_val=60, d=24, seed=1)
    subsets = calibration_subsets(fs.names, 4, size=3, seed=2)
    truth = planted_truth(fs, subsets, lam_true, noise=0.005)
    cal = calibrate(fs, subsets, truth, theta0="meta_init", grid=GRID)
    assert cal.lam == lam_true and cal.source == "calibrated" and cal.theta0 == "meta_init"
    table = cal.frame()
    assert list(table["lam"]) == sorted(GRID)
    errs = table.set_index("lam")["mean_relative_error_loss"]
    assert errs.idxmin() == lam_true and errs[lam_true] < 0.01
    assert {"median_relative_error_loss", "spearman_loss", "mean_abs_error_accuracy"} <= set(table.columns)
    assert cal.at_lam()["mean_relative_error_loss"] == errs[lam_true]
    assert cal.n_pairs == 12 and len(cal.subsets) == 4 and not cal.at_grid_edge
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_pinned_lambda_overrides_but_keeps_the_table():
    fs = synthetic_features(n_datasets=5, n_train=80, n_val=40, d=16, seed=3)
    subsets = calibration_subsets(fs.names, 2, size=3, seed=0)
    truth = planted_truth(fs, subsets, 1e-2)
    cal = calibrate(fs, subsets, truth, theta0="fresh_lora", grid=GRID, pinned_lam=0.5)
    assert cal.lam == 0.5 and cal.source == "pinned" and 0.5 in cal.grid
    assert cal.at_lam()["mean_relative_error_loss"] > 0  # the pinned value's own error is on the table
    bare = calibrate(fs, [], {}, theta0="fresh_lora", pinned_lam=1e-3)  # no fine-tunes: no table
    assert bare.lam == 1e-3 and bare.table == []
    with pytest.raises(ValueError, match="pinned"):
        calibrate(fs, [], {}, theta0="fresh_lora")
    with pytest.raises(ValueError, match="theta0"):
        calibrate(fs, subsets, truth, theta0="somewhere")


def test_grid_edge_is_flagged_and_ties_go_to_the_smaller_lambda():
    fs = synthetic_features(n_datasets=5, n_train=80, n_val=40, d=16, seed=4)
    subsets = calibration_subsets(fs.names, 3, size=3, seed=1)
    cal = calibrate(fs, subsets, planted_truth(fs, subsets, 10.0), theta0="meta_init", grid=GRID)
    assert cal.lam == 1.0 and cal.at_grid_edge  # the truth lies beyond the grid: say so
    table = [{"lam": 0.1, "calibration": {"mean_relative_error_loss": 0.2}},
             {"lam": 0.01, "calibration": {"mean_relative_error_loss": 0.2}},
             {"lam": 1.0, "calibration": {"mean_relative_error_loss": 0.3}}, {"lam": 1e-9, "error": "singular"}]
    assert choose_lam(table) == 0.01


def test_error_table_reports_each_role_apart():
    fs = synthetic_features(n_datasets=6, n_train=80, n_val=40, d=16, seed=5)
    subs = calibration_subsets(fs.names, 4, size=3, seed=3)
    truth = planted_truth(fs, subs, 3e-2)
    table = error_table(fs, truth, (3e-2, 1.0), {"calibration": subs[:2], "eval": subs[2:]})
    assert [r["lam"] for r in table] == [3e-2, 1.0]
    assert table[0]["calibration"]["mean_relative_error_loss"] < 1e-9 and table[0]["eval"]["spearman_loss"] > 0.99
    assert table[1]["eval"]["mean_relative_error_loss"] > table[0]["eval"]["mean_relative_error_loss"]


def test_calibration_subsets_are_distinct_and_capped():
    names = [f"d{i}" for i in range(4)]
    subs = calibration_subsets(names, 10, size=3)
    assert len(subs) == 4 and len({s.id for s in subs}) == 4  # C(4, 3) = 4
    assert calibration_subsets(names[:2], 3, size=3)[0].members == ("d0", "d1")


# ----------------------------------------------------------------------------------------------- folds


def test_validation_folds_are_disjoint_stratified_and_deterministic():
    y = np.array([0] * 30 + [1] * 10 + [2] * 1)
    m = weights_fold_mask(y, seed=3)
    assert m.sum() == 15 + 5 + 0  # half of each label; a single row stays in selection
    assert (weights_fold_mask(y, seed=3) == m).all() and (weights_fold_mask(y, seed=4) != m).any()
    items = [f"x{i}" for i in range(len(y))]
    sel, wts = split_validation(items, y, seed=3)
    assert not set(sel) & set(wts) and sorted(sel + wts) == sorted(items)
    assert sel == [x for x, k in zip(items, m) if not k]  # order kept
    two = weights_fold_mask(np.array([5, 5]), weights_share=0.9)
    assert two.sum() == 1  # each fold keeps a row
    with pytest.raises(ValueError):
        weights_fold_mask(y, weights_share=1.0)
    with pytest.raises(ValueError):
        split_validation(items[:3], y)


def test_the_seed_mean_truth_and_the_seeds_spread():
    from grouplora.ml.calibration import mean_truth, seed_spread
    s = Subset.of(["a", "b"])
    runs = {"s0": {s.id: {"a": {"loss": 1.0, "accuracy": 0.5, "n": 10}, "b": {"loss": 0.2, "accuracy": 1.0, "n": 4}}},
            "s1": {s.id: {"a": {"loss": 1.1, "accuracy": 0.7, "n": 10}, "b": {"loss": 0.2, "accuracy": 0.5, "n": 4}}}}
    mean = mean_truth(list(runs.values()))
    assert mean[s.id]["a"] == pytest.approx({"loss": 1.05, "accuracy": 0.6, "n": 10})
    assert mean[s.id]["b"]["n"] == 4
    # every ordered pair of runs: a's |1.1 - 1.0| / 1.0 and |1.0 - 1.1| / 1.1, b's 0 twice
    spread = seed_spread(runs, [s])
    assert spread["n_pairs"] == 4 and spread["runs"] == ["s0", "s1"]
    assert spread["mean_relative_error_loss"] == pytest.approx((0.1 + 0.1 / 1.1) / 4)
    assert spread["mean_abs_error_accuracy"] == pytest.approx((0.2 + 0.5) * 2 / 4)
