"""Task grouping: symmetrization, the SDP solver and its rounding, spectral clustering, choice of m, plots."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grouplora.ml.clustering import (
    _partitions,
    adjusted_rand_index,
    brute_force_partition,
    canonical_labels,
    choose_m,
    excess_score,
    partition_matrix,
    partition_objective,
    sdp_cluster,
    spectral_cluster,
    symmetrize,
)
from grouplora.ml.plots import accuracy_table_png, affinity_heatmap, bar_chart, line_chart


def planted(sizes: list[int], noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw (asymmetric) affinity: 1 inside a group, 0 across, plus Gaussian noise; shuffled order."""
    rng = np.random.default_rng(seed)
    lab = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    T = (lab[:, None] == lab[None, :]).astype(float) + noise * rng.standard_normal((lab.size, lab.size))
    return T, canonical_labels(lab)


def random_partition(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    lab = np.concatenate([np.arange(m), rng.integers(0, m, n - m)])  # every group non-empty
    return rng.permutation(lab)


# ---------------------------------------------------------------- symmetrize and small helpers


def test_symmetrize_modes() -> None:
    rng = np.random.default_rng(0)
    T = rng.standard_normal((7, 7))
    np.testing.assert_allclose(symmetrize(T), (T + T.T) / 2)
    C = symmetrize(T, "row_center")
    np.testing.assert_allclose(C, C.T)
    np.testing.assert_allclose(np.diag(C), 0.0, atol=1e-12)
    # row_zscore makes each dataset's row unit-free: rescaling/offsetting one row changes nothing.
    T2 = T.copy()
    T2[3] = 50.0 * T2[3] + 7.0
    np.testing.assert_allclose(symmetrize(T2, "row_zscore"), symmetrize(T, "row_zscore"), atol=1e-12)
    assert not np.allclose(symmetrize(T2), symmetrize(T))
    with pytest.raises(ValueError, match="normalize"):
        symmetrize(T, "zscore")  # type: ignore[arg-type]


def test_row_offsets_do_not_move_the_sdp_objective() -> None:
    # X·1 = 1 turns a per-row offset into a constant, so row_center only shifts every partition's score.
    rng = np.random.default_rng(1)
    T = rng.standard_normal((9, 9)) + 3.0 * rng.standard_normal(9)[:, None]
    A, Ac = symmetrize(T), symmetrize(T, "row_center")
    diffs = {round(partition_objective(A, lab) - partition_objective(Ac, lab), 9)
             for lab in (random_partition(9, m, rng) for m in (1, 2, 3, 4, 9) for _ in range(3))}
    assert len(diffs) == 1 and abs(diffs.pop() - np.trace(T)) < 1e-8


def test_canonical_labels_and_partition_objective() -> None:
    np.testing.assert_array_equal(canonical_labels([2, 2, 0, 1, 0]), [0, 0, 1, 2, 1])
    np.testing.assert_array_equal(canonical_labels(np.array([5, 3, 5])), canonical_labels([0, 1, 0]))
    rng = np.random.default_rng(2)
    A = symmetrize(rng.standard_normal((8, 8)))
    lab = random_partition(8, 3, rng)
    X = partition_matrix(lab)
    assert partition_objective(A, lab) == pytest.approx(float(np.sum(A * X)))
    np.testing.assert_allclose(X.sum(axis=1), 1.0)
    assert np.trace(X) == pytest.approx(3.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: symmetrize(np.ones((3, 4))),
        lambda: symmetrize(np.array([[1.0, np.nan], [0.0, 1.0]])),
        lambda: symmetrize(np.ones(3)),
        lambda: sdp_cluster(np.eye(4), 5),
        lambda: sdp_cluster(np.eye(4), 0),
        lambda: sdp_cluster(np.eye(4), 2.5),  # type: ignore[arg-type]
        lambda: sdp_cluster(np.array([[0.0, 1.0], [0.0, 0.0]]), 1),  # not symmetric
        lambda: sdp_cluster(np.array([[0.0, np.inf], [np.inf, 0.0]]), 1),
        lambda: spectral_cluster(np.ones((3, 2)), 2),
        lambda: spectral_cluster(np.eye(4), 5),
        lambda: choose_m(np.eye(4), []),
        lambda: choose_m(np.eye(4), [2, 7]),
        lambda: choose_m(np.eye(4), [2], "gap"),  # type: ignore[arg-type]
        lambda: partition_objective(np.eye(3), np.array([0, 1])),
    ],
)
def test_bad_inputs_raise_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- SDP and spectral on planted partitions


@pytest.mark.parametrize(("sizes", "seed"), [([4, 4, 4], 0), ([6] * 5, 1), ([3, 5, 7, 9], 2)])
def test_planted_partitions_are_recovered(sizes: list[int], seed: int) -> None:
    T, truth = planted(sizes, noise=0.3, seed=seed)
    A = symmetrize(T)
    m = len(sizes)
    res = sdp_cluster(A, m, seed=seed)
    np.testing.assert_array_equal(res.labels, truth)
    np.testing.assert_array_equal(spectral_cluster(A, m, seed=seed), truth)
    assert res.converged
    # Clear blocks make the relaxation tight: the dual bound certifies the partition is optimal.
    assert res.certified_gap <= 1e-3 * abs(res.rounded_objective)


@pytest.mark.parametrize(("sizes", "noise"), [([6] * 5, 0.3), ([5] * 6, 1.5)])
def test_sdp_solution_is_feasible_and_bounds_are_ordered(sizes: list[int], noise: float) -> None:
    T, _ = planted(sizes, noise=noise, seed=3)  # noise 1.5: no clean blocks, the relaxation is not tight
    A = symmetrize(T)
    n, m = A.shape[0], len(sizes)
    res = sdp_cluster(A, m)
    X = res.X
    np.testing.assert_allclose(X, X.T, atol=1e-10)
    assert np.linalg.eigvalsh(X).min() >= -1e-6
    assert X.min() >= -1e-6
    np.testing.assert_allclose(X.sum(axis=1), 1.0, atol=1e-6)
    assert np.trace(X) == pytest.approx(m, abs=1e-6)
    assert res.objective == pytest.approx(float(np.sum(A * X)))
    assert res.rounded_objective == pytest.approx(partition_objective(A, res.labels))
    rng = np.random.default_rng(0)
    best_random = max(partition_objective(A, random_partition(n, m, rng)) for _ in range(200))
    tol = 1e-9 * n * np.abs(A).max()
    assert res.upper_bound >= res.objective - tol
    assert res.objective >= res.rounded_objective - tol
    assert res.rounded_objective > best_random
    assert sorted(np.unique(res.labels)) == list(range(m))
    if noise > 1:  # a genuinely fractional relaxation: the bound sits strictly above the partition
        assert res.upper_bound > res.rounded_objective + 1e-3 * abs(res.rounded_objective)
        assert res.upper_bound - res.objective <= 1e-2 * abs(res.objective)  # solver accuracy


def test_sdp_matches_brute_force_on_tiny_instances() -> None:
    rng = np.random.default_rng(4)
    assert sum(1 for _ in _partitions(6, 3)) == 90  # Stirling number S(6, 3)
    for trial in range(12):
        A = symmetrize(rng.standard_normal((6, 6)))
        m = 1 + trial % 6
        best_labels, best_obj = brute_force_partition(A, m)
        res = sdp_cluster(A, m)
        assert res.upper_bound >= best_obj - 1e-9  # the relaxation bounds every partition
        assert res.rounded_objective == pytest.approx(best_obj, abs=1e-9)
        np.testing.assert_array_equal(res.labels, best_labels)


def test_edge_m_and_determinism() -> None:
    T, _ = planted([4, 4], noise=0.8, seed=5)
    A = symmetrize(T)
    one, all_ = sdp_cluster(A, 1), sdp_cluster(A, 8)
    np.testing.assert_array_equal(one.labels, 0)
    np.testing.assert_array_equal(all_.labels, np.arange(8))
    np.testing.assert_allclose(all_.X, np.eye(8))
    assert one.objective == pytest.approx(A.sum() / 8)
    a, b = sdp_cluster(A, 3, seed=7), sdp_cluster(A, 3, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(spectral_cluster(A, 3, seed=7), spectral_cluster(A, 3, seed=7))
    # Scale and shift do not change the partition (c·11ᵀ is a constant on the feasible set).
    np.testing.assert_array_equal(sdp_cluster(10.0 * A - 3.0, 3, seed=7).labels, a.labels)


# ---------------------------------------------------------------- choice of m


@pytest.mark.parametrize(("sizes", "seed"), [([4, 4, 4], 0), ([6] * 5, 1)])
def test_choose_m_finds_planted_m(sizes: list[int], seed: int) -> None:
    A = symmetrize(planted(sizes, noise=0.3, seed=seed)[0])
    m, table = choose_m(A, range(1, 9))
    assert m == len(sizes)
    assert list(table["m"]) == list(range(1, 9))
    assert table["score"].idxmax() == m - 1
    m_gap, gap_table = choose_m(A, range(2, 9), "eigengap")
    assert m_gap == len(sizes)
    assert {"lambda_m", "lambda_next", "score"} <= set(gap_table.columns)
    m_spec, _ = choose_m(A, range(2, 9), clusterer="spectral")
    assert m_spec == len(sizes)


def test_excess_score_prefers_truth_over_merges_and_splits() -> None:
    T, truth = planted([5, 5, 5], noise=0.2, seed=6)
    A = symmetrize(T)
    merged = np.where(truth == 2, 1, truth)
    split = truth.copy()
    split[np.flatnonzero(truth == 0)[:2]] = 3
    assert excess_score(A, truth) > excess_score(A, merged)
    assert excess_score(A, truth) > excess_score(A, split)
    assert excess_score(A, np.zeros(15, dtype=int)) == pytest.approx(0.0, abs=1e-12)


def test_eigengap_says_one_group_on_noise() -> None:
    A = symmetrize(np.random.default_rng(7).standard_normal((30, 30)))
    assert choose_m(A, range(1, 8), "eigengap")[0] == 1


# ---------------------------------------------------------------- plots


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_affinity_heatmap_png(tmp_path: Path) -> None:
    T, lab = planted([4, 4, 4], noise=0.3, seed=0)
    names = [f"dataset_{i}" for i in range(12)]
    out = affinity_heatmap(T, names, lab, title="Affinity", path=tmp_path / "figs" / "heat.png")
    assert out == tmp_path / "figs" / "heat.png"
    w, h = png_size(out)
    assert 400 < w < 3000 and 400 < h < 3000
    assert out.stat().st_size > 10_000
    plain = affinity_heatmap(np.abs(T), names, title="Affinity", path=tmp_path / "plain.png")
    assert png_size(plain)[0] > 400
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["figs", "heat.png", "plain.png"]  # no temp files left
    with pytest.raises(ValueError):
        affinity_heatmap(T, names[:5], path=tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_accuracy_table_and_bar_chart_png(tmp_path: Path) -> None:
    acc = {
        "base": {"ds_a": 61.0, "ds_b": 70.5, "ds_c": 55.0},
        "single LoRA": {"ds_a": 66.0, "ds_b": np.nan, "ds_c": 58.5},
        "SDP groups": {"ds_a": 68.5, "ds_b": 72.0, "ds_c": 57.0},
    }
    out = accuracy_table_png(acc, tmp_path / "acc.png", "Accuracy (%)")
    w, h = png_size(out)
    assert w > 300 and h > 100 and out.stat().st_size > 5_000
    wide = pd.DataFrame(np.random.default_rng(0).uniform(0.4, 0.9, (3, 40)), index=["a", "b", "c"])
    tall = accuracy_table_png(wide, tmp_path / "wide.png", "Accuracy")
    tw, th = png_size(tall)
    assert th > tw  # 40 datasets are laid out as rows
    bars = bar_chart({"g0": 1.5, "g1": -0.4, "g2": 0.2}, tmp_path / "bar.png", "Gain", "accuracy gain")
    assert png_size(bars)[0] > 300
    with pytest.raises(ValueError):
        bar_chart({}, tmp_path / "empty.png", "t", "x")
    line = line_chart([0.001, 0.01, 0.1], {"mean": [0.01, 0.02, 0.2], "median": [0.005, 0.01, 0.1]},
                      tmp_path / "line.png", title="Error", xlabel="scale", ylabel="relative error")
    assert png_size(line)[0] > 300
    with pytest.raises(ValueError, match="points"):
        line_chart([1, 2], {"a": [1.0]}, tmp_path / "bad.png", title="t", xlabel="x", ylabel="y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.png", "bar.png", "line.png", "wide.png"]
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_partition_datasets_finds_planted_blocks_and_names_them():
    """Two blocks that help themselves and hurt each other (the positive control's twins, as a matrix)."""
    from grouplora.ml.clustering import partition_datasets

    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "a_swap", "b_swap", "c_swap"]
    block = np.kron(np.array([[1.0, -1.0], [-1.0, 1.0]]), np.ones((3, 3)))
    T = -0.7 + 0.05 * block + 0.005 * rng.standard_normal((6, 6))
    part = partition_datasets(T, names, max_m=4)
    assert sorted(map(sorted, part.groups)) == [["a", "b", "c"], ["a_swap", "b_swap", "c_swap"]]
    assert part.m == 2 and part.m_scores is not None and part.group_of("a") != part.group_of("a_swap")
    assert part.A[0, 3] < 0 < part.A[0, 1]  # row z-scores: the twin is below the row mean
    fixed = partition_datasets(T, names, m=3, method="spectral")
    assert fixed.m == 3 and fixed.m_scores is None
    with pytest.raises(ValueError, match="names"):
        partition_datasets(T, names[:5])


# ---------------------------------------------------------------- adjusted Rand index


def test_adjusted_rand_index_known_values_and_chance() -> None:
    from itertools import permutations
    # hand-computed: Σ C(n_ij, 2) = 1, row pairs 2, column pairs 1, C(4, 2) = 6 → (1 − 1/3) / (3/2 − 1/3) = 4/7
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)  # every pair disagrees
    # the same partition under other label names, in either order
    a = [2, 2, 0, 1, 1, 0, 2]
    assert adjusted_rand_index(a, [5, 5, 7, 9, 9, 7, 5]) == pytest.approx(1.0)
    assert adjusted_rand_index(a, [0, 1, 0, 1, 0, 1, 0]) == pytest.approx(adjusted_rand_index([0, 1, 0, 1, 0, 1, 0], a))
    assert adjusted_rand_index([0] * 5, [3] * 5) == 1.0 and adjusted_rand_index(range(5), range(5, 10)) == 1.0
    # "adjusted": averaged over every relabeling of the items (fixed group sizes) it is exactly 0
    b = [0, 0, 0, 1, 1, 2]
    mean = np.mean([adjusted_rand_index(a[:6], p) for p in permutations(b)])
    assert abs(mean) < 1e-12
    with pytest.raises(ValueError, match="same length"):
        adjusted_rand_index([0, 1], [0, 1, 1])
