"""Batched subset estimation against an independent per-subset solver, plus subsets and scoring."""

from __future__ import annotations

import hashlib

from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_expit

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = lambda *_a, **_k: nullcontext()  # noqa: E731

from grouplora.ml.estimation import (
    FeatureSet,
    Split,
    estimate,
    estimate_subsets,
    fit_subsets,
    objective,
    score,
    solve_subsets,
    synthetic_features,
)
from grouplora.ml.subsets import Subset, estimation_subsets, make_subsets, subset_id


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: on a shared 2-core box extra threads only add synchronization stalls."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


def reference_w(fs: FeatureSet, members, lam: float) -> tuple[np.ndarray, float]:
    """Independent solver: scipy L-BFGS-B, analytic gradient, tight tolerances, float64 numpy."""
    f0 = np.concatenate([fs.train[m].f0 for m in members])
    G = np.concatenate([fs.train[m].G for m in members]).astype(np.float64)
    n = len(f0)

    def fg(w):
        m = f0 + G @ w
        return -log_expit(m).mean() + lam * w @ w, G.T @ (-expit(-m)) / n + 2 * lam * w

    r = minimize(fg, np.zeros(G.shape[1]), jac=True, method="L-BFGS-B",
                 options={"maxiter": 20000, "maxcor": 50, "gtol": 1e-10, "ftol": 0.0})
    assert np.linalg.norm(r.jac) < 1e-8, r.message  # gap to the optimum <= |grad|^2 / (4 lam): negligible
    return r.x, float(r.fun)


@pytest.fixture(scope="module")
def fs() -> FeatureSet:
    return synthetic_features(6, n_train=120, n_val=30, d=40, seed=3)


@pytest.fixture(scope="module")
def subsets(fs) -> list[Subset]:
    return make_subsets(list(fs.names), n_random=6, size=4, seed=1)


# ------------------------------------------------------------------------------------------ optimality


@pytest.mark.parametrize(
    "signal, scale, lam",
    [(0.5, 1.0, 1e-3), (1.0, 3.0, 1e-3), (0.5, 1.0, 0.1), (1.0, 3.0, 1e-5)],
    ids=["mild", "hard-curvature-shift", "strong-reg", "weak-reg"],
)
def test_batched_solution_matches_independent_solver(signal, scale, lam):
    fs = synthetic_features(5, n_train=150, n_val=20, d=48, signal=signal, scale=scale, seed=7)
    subs = make_subsets(list(fs.names), n_random=4, size=3, seed=0)
    # weak lam: ||w*|| ~ 40, far from the w = 0 metric, and objectives ~ 5e-3; the gap bound |g|^2 / (4 lam)
    # then needs a tighter tol for 1e-7 relative, and a few subsets need > 100 iterations
    tol = 1e-6 if lam >= 1e-3 else 1e-8
    res = solve_subsets(fs, subs, lam=lam, tol=tol, max_iter=100 if lam >= 1e-3 else 400)
    assert res.converged.all() and (res.grad_norm <= tol).all()
    assert res.iterations.min() >= 1 and res.data_passes >= 2
    for k, s in enumerate(subs):
        w_ref, f_ref = reference_w(fs, s.members, lam)
        ours = objective(fs, s, res.W[k], lam)
        assert (ours - f_ref) / abs(f_ref) < 1e-7, (s.members, ours, f_ref)
        assert ours == pytest.approx(res.objective[k], rel=1e-12, abs=1e-13)  # reported objective is exact
        # strong convexity: ||w - w*|| <= ||grad|| / (2 lam)
        assert np.linalg.norm(res.W[k] - w_ref) <= res.grad_norm[k] / (2 * lam) + 1e-6


def test_tight_tolerance_recovers_w(fs, subsets):
    W = fit_subsets(fs, subsets, tol=1e-10)
    for k in (0, 7, len(subsets) - 1):
        w_ref, _ = reference_w(fs, subsets[k].members, 1e-3)
        np.testing.assert_allclose(W[k], w_ref, atol=1e-6 * (1 + np.abs(w_ref).max()))


def test_chunking_and_working_set_do_not_change_the_answer(fs, subsets):
    a = solve_subsets(fs, subsets, tol=1e-9)
    b = solve_subsets(fs, subsets, tol=1e-9, chunk_size=4, memory=3)
    np.testing.assert_allclose(a.W, b.W, atol=1e-5)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-12)


def test_max_iter_warns_and_reports_unconverged(fs, subsets):
    with pytest.warns(RuntimeWarning, match="did not reach"):
        r = solve_subsets(fs, subsets, tol=1e-12, max_iter=2)
    assert not r.converged.all() and (r.iterations <= 2).all()


def test_objective_is_the_exact_formula(fs):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(fs.d)
    f = np.concatenate([fs.train["ds001"].f0 + fs.train["ds001"].G.astype(float) @ w,
                        fs.train["ds004"].f0 + fs.train["ds004"].G.astype(float) @ w])
    direct = np.mean(np.log1p(np.exp(-f))) + 0.3 * w @ w
    assert objective(fs, ["ds004", "ds001"], w, 0.3) == pytest.approx(direct, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        objective(fs, ["ds001"], w[:-1], 0.3)


def test_single_example_dataset_works():
    base = synthetic_features(3, n_train=50, n_val=10, d=16, seed=2)
    rng = np.random.default_rng(5)
    train = {k: (v.f0, v.G) for k, v in base.train.items()}
    val = {k: (v.f0, v.G) for k, v in base.val.items()}
    train["tiny"] = (np.array([-0.7]), rng.standard_normal((1, 16)).astype(np.float32))
    val["tiny"] = (np.array([0.2]), rng.standard_normal((1, 16)).astype(np.float32))
    fs = FeatureSet.from_arrays(train, val)
    subs = [Subset.of(["tiny"]), Subset.of(["tiny", "ds000"])]
    res = solve_subsets(fs, subs)
    for k, s in enumerate(subs):
        _, f_ref = reference_w(fs, s.members, 1e-3)
        assert (objective(fs, s, res.W[k], 1e-3) - f_ref) / f_ref < 1e-7
    df = score(fs, subs, res.W)
    row = df[(df.subset_id == subs[0].id) & (df.dataset == "tiny")].iloc[0]
    f = 0.2 + val["tiny"][1][0].astype(float) @ res.W[0]
    assert row.n_val == 1 and row.est_margin == pytest.approx(f) and row.est_accuracy == float(f > 0)


# ---------------------------------------------------------------------------------------------- scoring


def test_score_matches_direct_computation(fs, subsets):
    W = fit_subsets(fs, subsets)
    df = score(fs, subsets, W)
    assert len(df) == len(subsets) * len(fs.names)
    assert list(df.columns) == ["subset_id", "members", "kind", "dataset", "in_subset",
                                "est_loss", "est_accuracy", "est_margin", "n_val"]
    assert list(df.dataset[: len(fs.names)]) == sorted(fs.names)
    for k, s in enumerate(subsets):
        for name in fs.names:
            row = df.iloc[k * len(fs.names) + fs.names.index(name)]
            v = fs.val[name]
            f = v.f0 + v.G.astype(np.float64) @ W[k]
            assert row.subset_id == s.id and row.members == list(s.members) and row.kind == s.kind
            assert row.dataset == name and row.in_subset == (name in s.members) and row.n_val == v.n
            assert row.est_loss == pytest.approx(np.logaddexp(0, -f).mean(), rel=1e-12)
            assert row.est_accuracy == pytest.approx((f > 0).mean(), abs=1e-15)
            assert row.est_margin == pytest.approx(f.mean(), rel=1e-12, abs=1e-12)
    # fine-tuning on a dataset should, on average, lower its own estimated loss against the base model (w = 0)
    base = score(fs, subsets, np.zeros_like(W))
    own = df.in_subset & (df.kind == "singleton")
    assert df.est_loss[own].mean() < base.est_loss[own].mean() - 0.05
    np.testing.assert_allclose(base.est_margin, [fs.val[n].f0.mean() for n in fs.names] * len(subsets))
    # members are fresh lists: mutating one row leaves the others alone
    df.members.iloc[0].append("x")
    assert df.members.iloc[1] == list(subsets[0].members)


def test_estimate_is_fit_then_score(fs, subsets):
    a = estimate(fs, subsets[:5], lam=1e-2)
    b = score(fs, subsets[:5], fit_subsets(fs, subsets[:5], lam=1e-2))
    pd.testing.assert_frame_equal(a, b)


def test_estimate_subsets_is_the_pipelines_step(fs, subsets):
    table, fit = estimate_subsets(fs, subsets[:5], lam=1e-2)
    np.testing.assert_allclose(fit.W, fit_subsets(fs, subsets[:5], lam=1e-2))
    pd.testing.assert_frame_equal(table.drop(columns="mode"), score(fs, subsets[:5], fit.W))
    assert set(table["mode"]) == {"linearized"}


def test_estimation_subsets_caps_what_cannot_exist():
    """The asset's and the benchmarks' subsets: n_random capped at the subsets that exist (4 datasets hold 4
    triples), size at the number of datasets, and no random ones at size <= 2 (they would repeat the pairs)."""
    names = ["a", "b", "c", "d"]
    kinds = lambda subs: [s.kind for s in subs].count("random")  # noqa: E731
    assert kinds(estimation_subsets(names, n_random=300, size=3, seed=0)) == 4
    assert kinds(estimation_subsets(names, n_random=2, size=3, seed=0)) == 2
    assert kinds(estimation_subsets(names, n_random=300, size=9, seed=0)) == 1  # size 4: the one set of all four
    assert kinds(estimation_subsets(names, n_random=300, size=2, seed=0)) == 0
    assert len(estimation_subsets(names, n_random=0, size=3, seed=0)) == 4 + 6
    with pytest.raises(ValueError, match="only 4 distinct"):
        make_subsets(names, n_random=300, size=3, seed=0)  # what the cap prevents


def test_dataset_without_validation_scores_nan(fs):
    train = {k: (v.f0, v.G) for k, v in fs.train.items()}
    val = {k: (v.f0, v.G) for k, v in fs.val.items() if k != "ds002"}
    fs2 = FeatureSet.from_arrays(train, val)
    df = estimate(fs2, [["ds002", "ds003"]])
    r = df[df.dataset == "ds002"].iloc[0]
    assert r.n_val == 0 and np.isnan(r.est_loss) and np.isnan(r.est_accuracy) and r.in_subset
    assert df[df.dataset != "ds002"].est_loss.notna().all()


def test_empty_subset_list(fs):
    assert fit_subsets(fs, []).shape == (0, fs.d)
    assert len(score(fs, [], np.zeros((0, fs.d)))) == 0


# ------------------------------------------------------------------------------------- inputs and errors


@pytest.mark.parametrize("lam", [0, -1e-3, float("nan"), float("inf")])
def test_lam_must_be_positive_and_finite(fs, lam):
    with pytest.raises(ValueError, match="lam"):
        fit_subsets(fs, [["ds000"]], lam=lam)
    with pytest.raises(ValueError, match="lam"):
        objective(fs, ["ds000"], np.zeros(fs.d), lam)


def test_lam_type_and_other_solver_arguments(fs):
    with pytest.raises(TypeError, match="lam"):
        fit_subsets(fs, [["ds000"]], lam="0.1")
    with pytest.raises(ValueError, match="tol"):
        fit_subsets(fs, [["ds000"]], tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        fit_subsets(fs, [["ds000"]], max_iter=0)


def test_unknown_dataset_in_subset_is_a_clear_error(fs):
    with pytest.raises(ValueError, match=r"not in the feature set: \['nope'\]"):
        fit_subsets(fs, [["ds000"], ["ds001", "nope"]])
    with pytest.raises(ValueError, match="nope"):
        score(fs, [["nope"]], np.zeros((1, fs.d)))


def test_dataset_without_training_rows_cannot_be_in_a_subset(fs):
    train = {k: (v.f0, v.G) for k, v in fs.train.items() if k != "ds005"}
    fs2 = FeatureSet.from_arrays(train, {k: (v.f0, v.G) for k, v in fs.val.items()})
    assert "ds005" in fs2.names
    with pytest.raises(ValueError, match=r"without training examples: \['ds005'\]"):
        fit_subsets(fs2, [["ds005"]])


def test_mismatched_feature_dimension_is_a_clear_error():
    z = np.zeros
    with pytest.raises(ValueError, match="mismatched feature dimension"):
        FeatureSet.from_arrays({"a": (z(3), z((3, 8))), "b": (z(2), z((2, 9)))}, {})
    with pytest.raises(ValueError, match="mismatched feature dimension"):
        FeatureSet.from_arrays({"a": (z(3), z((3, 8)))}, {"a": (z(2), z((2, 7)))})
    df = pd.DataFrame({"dataset": ["a", "a"], "split": ["train", "train"], "f0": [0.0, 1.0],
                       "features": [np.zeros(8), np.zeros(9)]})
    with pytest.raises(ValueError, match="mismatched feature dimension"):
        FeatureSet.from_frame(df)
    with pytest.raises(ValueError, match="need f0"):
        FeatureSet.from_arrays({"a": (z(3), z((4, 8)))}, {})
    with pytest.raises(ValueError, match="finite"):
        FeatureSet.from_arrays({"a": (np.array([np.nan]), z((1, 8)))}, {})


def test_score_checks_W_shape(fs, subsets):
    with pytest.raises(ValueError, match="W must have shape"):
        score(fs, subsets, np.zeros((len(subsets), fs.d + 1)))


def test_from_frame_round_trip(fs):
    rows = []
    for split, part in (("train", fs.train), ("validation", fs.val)):
        for name, sp in part.items():
            rows += [{"dataset": name, "split": split, "f0": a, "features": g} for a, g in zip(sp.f0, sp.G)]
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0).sort_values(["dataset"], kind="stable")
    back = FeatureSet.from_frame(df)
    assert back.names == fs.names and back.d == fs.d
    for name in fs.names:
        # row order within a dataset follows the frame: compare as multisets via sorting on f0
        o1, o2 = np.argsort(back.train[name].f0), np.argsort(fs.train[name].f0)
        np.testing.assert_array_equal(back.train[name].f0[o1], fs.train[name].f0[o2])
        np.testing.assert_array_equal(back.train[name].G[o1], fs.train[name].G[o2])
        assert back.val[name].n == fs.val[name].n
    X = np.stack(df.features.to_numpy())
    again = FeatureSet.from_frame(df.drop(columns="features"), features=X)
    np.testing.assert_array_equal(again.train["ds003"].G, back.train["ds003"].G)
    with pytest.raises(ValueError, match="unknown split"):
        FeatureSet.from_frame(df.assign(split="dev"))
    with_test = pd.concat([df, df.head(7).assign(split="test")], ignore_index=True)  # test rows are ignored
    assert FeatureSet.from_frame(with_test).train["ds000"].n == fs.train["ds000"].n
    with pytest.raises(ValueError, match="missing columns"):
        FeatureSet.from_frame(df.drop(columns="f0"))


def test_split_keeps_float32_features(fs):
    assert isinstance(fs.train["ds000"], Split)
    assert fs.train["ds000"].G.dtype == np.float32 and fs.train["ds000"].f0.dtype == np.float64


# ---------------------------------------------------------------------------------------------- subsets


def test_subset_ids_are_stable_and_order_independent():
    expected = "s_" + hashlib.sha256("alpha\x1fbeta\x1fgamma".encode()).hexdigest()[:12]
    assert subset_id(["gamma", "alpha", "beta"]) == subset_id(("beta", "gamma", "alpha")) == expected
    assert subset_id(["a", "b"]) == "s_f04cdced9736"  # pinned: the same in every process and version
    assert subset_id(["a,b"]) != subset_id(["a", "b"])
    s = Subset.of(["b", "a"])
    assert s.members == ("a", "b") and s.kind == "pair" and s.id == subset_id(["a", "b"])
    with pytest.raises(ValueError, match="does not match"):
        Subset(id="s_000000000000", members=("a",), kind="singleton")
    with pytest.raises(ValueError, match="sorted and unique"):
        Subset(id=subset_id(["b", "a"]), members=("b", "a"), kind="pair")


def test_make_subsets_counts_kinds_and_determinism():
    names = [f"t{i}" for i in range(7)]
    subs = make_subsets(names, n_random=10, size=3, seed=4)
    assert len(subs) == 7 + 21 + 10
    assert [s.kind for s in subs] == ["singleton"] * 7 + ["pair"] * 21 + ["random"] * 10
    assert len({s.id for s in subs}) == len(subs)
    assert all(list(s.members) == sorted(s.members) for s in subs)
    assert all(len(s) == 3 for s in subs[28:])
    assert make_subsets(names, n_random=10, size=3, seed=4) == subs
    assert make_subsets(names[::-1], n_random=10, size=3, seed=4) == subs  # input order does not matter
    assert make_subsets(names, n_random=10, size=3, seed=5)[28:] != subs[28:]
    only = make_subsets(names, n_random=5, size=3, seed=4, include_singletons=False, include_pairs=False)
    assert len(only) == 5 and all(s.kind == "random" for s in only)
    # random pairs never repeat the pairs already listed; asking for more than exist is an error
    pairs = make_subsets(names, n_random=0, size=2, seed=0)
    assert len(pairs) == 28
    with pytest.raises(ValueError, match="only 0 distinct"):
        make_subsets(names, n_random=1, size=2, seed=0)
    assert len(make_subsets(names, n_random=35, size=3, seed=0)) == 7 + 21 + 35  # all C(7,3)


def test_make_subsets_large_space_uses_sampling():
    names = [f"d{i:03d}" for i in range(60)]
    subs = make_subsets(names, n_random=50, size=8, seed=0, include_pairs=False)
    assert len(subs) == 60 + 50 and len({s.id for s in subs}) == 110
    assert subs == make_subsets(names, n_random=50, size=8, seed=0, include_pairs=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(names=["a", "a"], n_random=0, size=1, seed=0), "duplicate"),
        (dict(names=[], n_random=0, size=1, seed=0), "empty"),
        (dict(names=["a", "b"], n_random=1, size=3, seed=0), "size"),
        (dict(names=["a", "b"], n_random=-1, size=1, seed=0), "n_random"),
        (dict(names="ab", n_random=0, size=1, seed=0), "list"),
    ],
)
def test_make_subsets_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_subsets(**kwargs)
    with pytest.raises(TypeError, match="size"):
        make_subsets(["a", "b"], n_random=1, size=1.5, seed=0)
