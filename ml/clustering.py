"""Partition n datasets into m groups from a task-affinity matrix (one LoRA adapter per group).

T[i, j] estimates how much dataset j helps dataset i (higher = more helpful). We symmetrize it into A and
solve the Peng-Wei k-means SDP used by the paper:

    maximize tr(A X)  s.t.  X ⪰ 0,  X ≥ 0 (elementwise),  X·1 = 1,  tr X = m.

For a partition into groups g, the matrix X_g = Σ_g 1_g 1_gᵀ / |g| is feasible and tr(A X_g) is
`partition_objective`, so the relaxation value is an upper bound on every partition's objective.

Two invariances follow from X·1 = 1 and tr X = m and matter for choosing a normalization:
adding b·1ᵀ (a per-row offset, before symmetrizing) or c·11ᵀ changes tr(A X) by a constant, and adding
c·I changes it by c·m. So row-centering does not move the SDP optimum; only row *rescaling* does.

The solver is a small ADMM (no cvxpy): the PSD cone plus the two affine constraints is a shifted
spectraplex with a closed-form projection (eigendecomposition on the complement of 1), X ≥ 0 is the
other block, and Anderson acceleration makes it converge in ~50-200 sweeps on typical inputs. A
Lagrangian dual bound certifies how far the rounded partition can be from the best one. Fine for n ≤ ~200.
Rounding: k-means on rows of X and on its top-m eigenvectors, then single-node local search.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np
import pandas as pd
from scipy.linalg import eigh, null_space

try:  # transitive dependency of scikit-learn; only used to pin small-matrix BLAS calls to one thread
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    from contextlib import nullcontext

    def threadpool_limits(*_a: object, **_k: object) -> nullcontext:  # type: ignore[misc]
        return nullcontext()

Normalize = Literal["none", "row_center", "row_zscore"]
ChooseMethod = Literal["excess", "eigengap"]

_SYM_TOL = 1e-8


# ---------------------------------------------------------------- validation and small helpers


def _check_square(T: np.ndarray, name: str = "affinity") -> np.ndarray:
    A = np.asarray(T, dtype=float)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {A.shape}")
    if A.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(A)):
        raise ValueError(f"{name} contains NaN or inf entries")
    return A


def _check_symmetric(A: np.ndarray) -> np.ndarray:
    A = _check_square(A)
    scale = max(1.0, float(np.max(np.abs(A))))
    if np.max(np.abs(A - A.T)) > _SYM_TOL * scale:
        raise ValueError("affinity must be symmetric; call symmetrize(T) first")
    return (A + A.T) / 2  # remove round-off asymmetry


def _check_m(m: int, n: int) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise ValueError(f"m must be an integer, got {m!r}")
    if not 1 <= m <= n:
        raise ValueError(f"m must be in [1, n={n}], got {m}")
    return int(m)


def canonical_labels(labels: Iterable[int]) -> np.ndarray:
    """Relabel groups 0, 1, ... in order of their smallest member index, so equal partitions compare equal."""
    lab = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels)
    if lab.ndim != 1:
        raise ValueError("labels must be 1-D")
    mapping: dict[int, int] = {}
    for v in lab.tolist():
        mapping.setdefault(v, len(mapping))
    return np.array([mapping[v] for v in lab.tolist()], dtype=int)


def partition_matrix(labels: np.ndarray) -> np.ndarray:
    """X = Σ_g 1_g 1_gᵀ / |g|: the SDP-feasible matrix of a partition."""
    lab = canonical_labels(labels)
    H = np.eye(lab.max() + 1)[lab]  # n × m one-hot
    return H @ np.diag(1.0 / H.sum(axis=0)) @ H.T


def partition_objective(A: np.ndarray, labels: np.ndarray) -> float:
    """Σ_g (Σ_{i,j∈g} A_ij) / |g|, which equals tr(A X) for X = partition_matrix(labels)."""
    A = _check_square(A)
    lab = np.asarray(labels)
    if lab.shape != (A.shape[0],):
        raise ValueError(f"labels must have length n={A.shape[0]}, got shape {lab.shape}")
    total = 0.0
    for g in np.unique(lab):
        idx = np.flatnonzero(lab == g)
        total += A[np.ix_(idx, idx)].sum() / idx.size
    return float(total)


# ---------------------------------------------------------------- symmetrize


def affinity_matrix_from(table: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """T[i, j] (names sorted) from long rows target, source, value; a pair that never shared a sampled subset
    gets the target's mean affinity."""
    wide = table.pivot(index="target", columns="source", values="value")
    names = sorted(set(wide.index) | set(wide.columns))
    wide = wide.reindex(index=names, columns=names)
    if wide.isna().any().any():
        wide = wide.apply(lambda row: row.fillna(row.mean()), axis=1)
    return wide.to_numpy(dtype=float), names


def symmetrize(T: np.ndarray, normalize: Normalize = "none") -> np.ndarray:
    """(T' + T'ᵀ)/2, where T' is T with each row optionally standardized first.

    Rows live on different scales: row i measures effects on dataset i in that dataset's own units
    (a hard dataset has larger, noisier loss changes), so without rescaling a few rows dominate tr(A X).

    - "none": plain (T + Tᵀ)/2, diagonal kept.
    - "row_center": T[i, j] - T[i, i], i.e. the gain of dataset i from j relative to i's own baseline;
      the diagonal becomes 0. Note the SDP optimum is invariant to per-row offsets (see module doc), so
      this only changes spectral clustering / modularity (which need a nonnegative shift) and readability.
    - "row_zscore": (T[i, j] - mean_i) / std_i with mean/std over the off-diagonal entries of row i, and a
      zero diagonal. Gives every dataset an equal vote; recommended when rows are in per-dataset loss or
      accuracy units. Self-affinity carries no pairwise information, so it is not kept (a large z-scored
      diagonal would otherwise reward putting that dataset in a small group).
    """
    A = _check_square(T, "T")
    n = A.shape[0]
    if normalize == "none":
        B = A
    elif normalize == "row_center":
        B = A - np.diag(A)[:, None]
    elif normalize == "row_zscore":
        if n < 3:
            raise ValueError("row_zscore needs n >= 3 (a row needs >= 2 off-diagonal entries)")
        off = ~np.eye(n, dtype=bool)
        rows = A[off].reshape(n, n - 1)
        mu = rows.mean(axis=1)
        sd = rows.std(axis=1)
        sd = np.where(sd > 1e-12 * max(1.0, float(np.abs(rows).max())), sd, 1.0)  # constant row -> all zeros
        B = (A - mu[:, None]) / sd[:, None]
        np.fill_diagonal(B, 0.0)
    else:
        raise ValueError(f"normalize must be 'none', 'row_center' or 'row_zscore', got {normalize!r}")
    return (B + B.T) / 2


# ---------------------------------------------------------------- SDP by ADMM


@dataclass(frozen=True)
class SdpResult:
    labels: np.ndarray  # canonical group ids 0..m-1, every group non-empty
    X: np.ndarray  # feasible relaxed solution: PSD, ≥ 0, X·1 = 1, tr X = m (to round-off)
    objective: float  # tr(A X); rounded_objective ≤ objective ≤ SDP optimum
    rounded_objective: float  # partition_objective(A, labels)
    upper_bound: float  # certified ≥ SDP optimum ≥ every partition's objective (Lagrangian dual of X ≥ 0)
    iterations: int
    converged: bool
    residual: float  # max of the primal (max|X - Z|) and dual residuals, on the scaled problem

    @property
    def certified_gap(self) -> float:
        """upper_bound - rounded_objective: no partition into m groups beats ours by more than this."""
        return self.upper_bound - self.rounded_objective


def _project_simplex(v: np.ndarray, s: float) -> np.ndarray:
    """Euclidean projection of v onto {x ≥ 0, Σx = s} (sort-based, Duchi et al. 2008)."""
    if s <= 0:
        return np.zeros_like(v)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - s
    k = np.arange(1, v.size + 1)
    rho = np.flatnonzero(u - css / k > 0)[-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


class _Spectraplex:
    """Projection onto C = {J/n + P Y Pᵀ : Y ⪰ 0, tr Y = m - 1}, P an orthonormal basis of 1⊥.

    C is exactly {X ⪰ 0, X·1 = 1, tr X = m}: X·1 = 1 makes 1/√n an eigenvector with eigenvalue 1, and the
    rest of X lives on 1⊥. Working in P's coordinates keeps the 1-direction out of the eigenvalue projection.
    """

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m
        self.P = null_space(np.ones((1, n)))  # n × (n-1)

    def __call__(self, M: np.ndarray) -> np.ndarray:
        Y = self.P.T @ M @ self.P
        w, V = eigh((Y + Y.T) / 2)
        lam = _project_simplex(w, self.m - 1.0)
        keep = lam > 0
        W = self.P @ V[:, keep]
        return np.full((self.n, self.n), 1.0 / self.n) + (W * lam[keep]) @ W.T


@dataclass
class _AdmmState:
    X: np.ndarray  # last projection onto C
    N: np.ndarray  # multiplier of X ≥ 0 (scaled-A units), N ≥ 0
    iterations: int
    converged: bool
    residual: float  # max(primal, dual) sup-norm residual


def _solve_sdp(M: np.ndarray, m: int, max_iter: int, tol: float, memory: int = 10) -> _AdmmState:
    """ADMM on  min -<M,X> + I_C(X) + I_{≥0}(Z)  s.t. X = Z, accelerated by Anderson mixing.

    One ADMM sweep (X = Π_C(Z - U + M/ρ), Z⁺ = max(X + U, 0), U⁺ = U + X - Z⁺) is a fixed-point map on
    w = (Z, U); plain ADMM crawls (thousands of sweeps at n = 100) on these degenerate, low-rank optima.
    Type-II Anderson acceleration with a residual-decrease safeguard (fall back to the plain sweep and
    clear the memory) cuts that 10-30x. M must already be centred and scaled to max|M| = 1.
    """
    n = M.shape[0]
    nn = n * n
    proj = _Spectraplex(n, m)
    rho = n / m  # balances |M| ~ 1 against entries of X ~ m/n; residual balancing adjusts it

    def sweep(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Z, U = w[:nn].reshape(n, n), w[nn:].reshape(n, n)
        X = proj(Z - U + M / rho)
        Zn = np.maximum(X + U, 0.0)
        return np.concatenate([Zn.ravel(), (U + X - Zn).ravel()]), X

    def residuals(g: np.ndarray) -> tuple[float, float]:
        return float(np.abs(g[nn:]).max()), rho * float(np.abs(g[:nn]).max())  # primal |X-Z⁺|, dual ρ|Z⁺-Z|

    # Feasible start: Y = (m-1)/(n-1) I, whose off-diagonal entries (n-m)/(n(n-1)) are ≥ 0.
    Z0 = np.full((n, n), 1.0 / n) + (m - 1) / (n - 1) * (np.eye(n) - 1.0 / n)
    w = np.concatenate([Z0.ravel(), np.zeros(nn)])
    fw, X = sweep(w)
    g = fw - w
    # Anderson history as rows of ring buffers (order does not matter for the least-squares mix).
    dW = np.empty((memory, 2 * nn))
    dG = np.empty((memory, 2 * nn))
    k = 0  # history entries written since the last reset
    since_rho = 0
    for it in range(1, max_iter + 1):
        r, s = residuals(g)
        if r <= tol and s <= tol:
            return _AdmmState(X, np.maximum(-rho * fw[nn:].reshape(n, n), 0.0), it, True, max(r, s))
        since_rho += 1
        if since_rho >= 50 and (r > 10 * s or s > 10 * r):  # residual balancing (Boyd et al. 2011, §3.4.1)
            f = 3.0 if r > 10 * s else 1 / 3.0
            rho *= f
            w = np.concatenate([w[:nn], w[nn:] / f])  # the scaled dual U = y/ρ
            fw, X = sweep(w)
            g = fw - w
            k, since_rho = 0, 0
            continue
        accepted = False
        if k:
            h = min(k, memory)
            DW, DG = dW[:h], dG[:h]
            H = DG @ DG.T
            H += (1e-10 * np.trace(H) / h + 1e-300) * np.eye(h)  # tiny ridge: history can be collinear
            cand = w + g - np.linalg.solve(H, DG @ g) @ (DW + DG)
            fc, Xc = sweep(cand)
            gc = fc - cand
            if np.linalg.norm(gc) < np.linalg.norm(g):
                w_new, fw_new, X_new, g_new, accepted = cand, fc, Xc, gc, True
        if not accepted:
            k = 0  # restart the memory after a rejected step
            w_new = fw
            fw_new, X_new = sweep(w_new)
            g_new = fw_new - w_new
        np.subtract(w_new, w, out=dW[k % memory])
        np.subtract(g_new, g, out=dG[k % memory])
        k += 1
        w, fw, X, g = w_new, fw_new, X_new, g_new
    r, s = residuals(g)
    return _AdmmState(X, np.maximum(-rho * fw[nn:].reshape(n, n), 0.0), max_iter, False, max(r, s))


def _pull_nonnegative(X: np.ndarray, m: int) -> np.ndarray:
    """Mix X ∈ C with the interior point X0 = J/n + (m-1)/(n-1)(I - J/n) just enough to make it ≥ 0.

    X0 ∈ C and X0 ≥ (n-m)/(n(n-1)) > 0 elementwise, so (1-θ)X + θX0 stays in C (convexity) and is
    nonnegative for θ = v/(v + min X0), v = -min X. This turns "X ≥ -tol" into exact feasibility at an
    objective cost of θ·(tr AX - tr AX0), tiny for v ~ tol.
    """
    n = X.shape[0]
    v = -float(X.min())
    if v <= 0:
        return X
    X0 = np.full((n, n), 1.0 / n) + (m - 1) / (n - 1) * (np.eye(n) - 1.0 / n)
    theta = v / (v + (n - m) / (n * (n - 1)))
    return np.maximum((1 - theta) * X + theta * X0, 0.0)  # max() only removes round-off at the zeros


def _dual_bound(A: np.ndarray, N: np.ndarray, m: int) -> float:
    """Upper bound on the SDP value from any N ≥ 0 (Lagrangian relaxation of X ≥ 0):
    OPT ≤ max_{X∈C} tr((A+N)X) = 1ᵀ(A+N)1/n + (m-1)·λ_max(Pᵀ(A+N)P), since tr(NX) ≥ 0 for feasible X."""
    n = A.shape[0]
    B = A + N
    if m == 1:
        return float(B.sum() / n)
    P = null_space(np.ones((1, n)))
    lam_max = float(np.linalg.eigvalsh(P.T @ B @ P)[-1])
    return float(B.sum() / n + (m - 1) * lam_max)


def _group_sums(A: np.ndarray, lab: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    H = np.eye(m)[lab]
    C = A @ H  # C[v, g] = Σ_{j∈g} A_vj
    return C, H.sum(axis=0), np.einsum("ig,ig->g", H, C)


def _kmeans(F: np.ndarray, m: int, seed: int, n_init: int = 10, max_iter: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, best of n_init; plain numpy because at n ≤ 200 points
    sklearn's threaded KMeans spends ~20 ms per run on thread start-up on a busy machine."""
    rng = np.random.default_rng(seed)
    n = F.shape[0]
    sq = np.einsum("ij,ij->i", F, F)
    best, best_inertia = np.zeros(n, dtype=int), np.inf
    for _ in range(n_init):
        centers = [F[rng.integers(n)]]
        d2 = np.maximum(sq - 2 * F @ centers[0] + centers[0] @ centers[0], 0.0)
        for _k in range(1, m):
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            c = F[rng.choice(n, p=p)]
            centers.append(c)
            d2 = np.minimum(d2, np.maximum(sq - 2 * F @ c + c @ c, 0.0))
        C = np.array(centers)
        lab = np.full(n, -1)
        for _it in range(max_iter):
            D = sq[:, None] - 2 * F @ C.T + np.einsum("ij,ij->i", C, C)[None, :]
            new = np.argmin(D, axis=1)
            if np.array_equal(new, lab):
                break
            lab = new
            for k in range(m):
                members = lab == k
                # an emptied cluster takes the point farthest from its center
                C[k] = F[members].mean(axis=0) if members.any() else F[int(np.argmax(D[np.arange(n), lab]))]
        inertia = float(np.sum((F - C[lab]) ** 2))
        if inertia < best_inertia - 1e-12:
            best, best_inertia = lab.copy(), inertia
    return best


def _fill_empty(A: np.ndarray, lab: np.ndarray, m: int) -> np.ndarray:
    """Give every empty group the node that is least attached to its (largest, size ≥ 2) group."""
    lab = lab.copy()
    while True:
        sizes = np.bincount(lab, minlength=m)
        empty = np.flatnonzero(sizes == 0)
        if empty.size == 0:
            return lab
        g = int(np.argmax(sizes))
        members = np.flatnonzero(lab == g)
        attach = A[np.ix_(members, members)].sum(axis=1) - np.diag(A)[members]
        lab[members[int(np.argmin(attach))]] = empty[0]


def _local_search(A: np.ndarray, lab: np.ndarray, m: int, max_moves: int) -> np.ndarray:
    """Best single-node moves while partition_objective improves and no group empties."""
    lab = lab.copy()
    d = np.diag(A)
    eps = 1e-12 * max(1.0, float(np.abs(A).max())) * A.shape[0]
    for _ in range(max_moves):
        C, size, S = _group_sums(A, lab, m)
        g = lab
        cg = C[np.arange(lab.size), g] - d  # attachment to own group, excluding self
        Sg_new = S[g] - 2 * cg - d
        with np.errstate(divide="ignore", invalid="ignore"):
            loss = np.where(size[g] > 1, Sg_new / np.maximum(size[g] - 1, 1), -np.inf) - S[g] / size[g]
        gain = (S[None, :] + 2 * C + d[:, None]) / (size[None, :] + 1) - S[None, :] / size[None, :]
        delta = gain + loss[:, None]
        delta[np.arange(lab.size), g] = -np.inf
        v, h = np.unravel_index(int(np.argmax(delta)), delta.shape)
        if not delta[v, h] > eps:
            break
        lab[v] = h
    return lab


def _round(A: np.ndarray, X: np.ndarray, m: int, seed: int) -> np.ndarray:
    """k-means on rows of X and on its top-m eigenvectors, then local search; keep the best partition."""
    w, V = np.linalg.eigh(X)
    emb = V[:, -m:] * np.sqrt(np.maximum(w[-m:], 0.0))
    best, best_obj = None, -np.inf
    for feats in (X, emb):
        lab = _kmeans(feats, m, seed)
        lab = _local_search(A, _fill_empty(A, lab, m), m, max_moves=20 * A.shape[0])
        obj = partition_objective(A, lab)
        if obj > best_obj + 1e-12:
            best, best_obj = lab, obj
    return canonical_labels(best)


def sdp_cluster(
    A: np.ndarray, m: int, *, seed: int = 0, max_iter: int = 3000, tol: float = 1e-5
) -> SdpResult:
    """Solve the k-means SDP on symmetric affinity A and round it to m non-empty groups.

    tol bounds the ADMM primal (max|X - Z|) and dual residuals, measured on A centred and scaled to
    max|A| = 1; the returned X is then pulled exactly feasible (X ⪰ 0, X ≥ 0, X·1 = 1, tr X = m), so
    rounded_objective ≤ objective ≤ SDP optimum ≤ upper_bound, all certified. When the rounded partition
    matrix scores higher than the solver's X it is returned as X (the relaxation is then tight to within
    certified_gap, and the partition is provably optimal to that accuracy).
    Deterministic for a given seed (it seeds k-means in the rounding). Warns (RuntimeWarning) and still
    rounds if max_iter is reached.
    """
    A = _check_symmetric(A)
    n = A.shape[0]
    m = _check_m(m, n)
    if max_iter < 1 or tol <= 0:
        raise ValueError("max_iter must be >= 1 and tol > 0")
    if m == 1 or m == n:
        # The only feasible points: X = J/n (tr X = 1 leaves no room off the 1-direction) and X = I
        # (rows sum to 1 with X ≥ 0, so X_ii ≤ 1, and the diagonal must sum to n).
        X = np.full((n, n), 1.0 / n) if m == 1 else np.eye(n)
        labels = np.zeros(n, dtype=int) if m == 1 else np.arange(n)
        obj = float(np.sum(A * X))
        return SdpResult(labels, X, obj, partition_objective(A, labels), obj, 0, True, 0.0)
    # The optimum is unchanged by A -> (A - c·11ᵀ)/s (c·11ᵀ adds c·n to every feasible objective), so solve
    # on a centred, unit-scale copy and keep tolerances and ρ scale-free.
    shift = float(A.mean())
    scale = float(np.abs(A - shift).max()) or 1.0
    with threadpool_limits(limits=1, user_api="blas"):  # small eigh: contended BLAS threads are ~10x slower
        st = _solve_sdp((A - shift) / scale, m, max_iter, tol)
        X = _pull_nonnegative(st.X, m)
        labels = _round(A, X, m, seed)
        upper = _dual_bound(A, st.N * scale, m)
    if not st.converged:
        warnings.warn(f"sdp_cluster: ADMM stopped at max_iter={max_iter} (residual {st.residual:.2e})", RuntimeWarning)
    rounded = partition_objective(A, labels)
    if rounded > float(np.sum(A * X)):
        # The partition matrix is feasible and scores higher: the relaxation is (numerically) tight, and
        # it is the more accurate SDP solution, so objective ≥ rounded_objective always holds.
        X = partition_matrix(labels)
    return SdpResult(
        labels=labels,
        X=X,
        objective=float(np.sum(A * X)),
        rounded_objective=rounded,
        upper_bound=upper,
        iterations=st.iterations,
        converged=st.converged,
        residual=st.residual,
    )


# ---------------------------------------------------------------- exact check for tiny n


def _partitions(n: int, m: int) -> Iterator[np.ndarray]:
    """All partitions of range(n) into exactly m non-empty groups, as restricted growth strings."""

    def rec(i: int, lab: list[int], k: int) -> Iterator[np.ndarray]:
        if n - i < m - k:  # not enough nodes left to open the missing groups
            return
        if i == n:
            yield np.array(lab)
            return
        for g in range(min(k + 1, m)):
            lab.append(g)
            yield from rec(i + 1, lab, max(k, g + 1))
            lab.pop()

    yield from rec(0, [], 0)


def brute_force_partition(A: np.ndarray, m: int) -> tuple[np.ndarray, float]:
    """Exact best partition by enumeration (n ≤ 12); returns canonical labels and their objective."""
    A = _check_symmetric(A)
    n = A.shape[0]
    m = _check_m(m, n)
    if n > 12:
        raise ValueError(f"brute force is for n <= 12, got n={n}")
    best, best_obj = None, -np.inf
    for lab in _partitions(n, m):
        obj = partition_objective(A, lab)
        if obj > best_obj + 1e-12:
            best, best_obj = lab, obj
    return canonical_labels(best), float(best_obj)


# ---------------------------------------------------------------- spectral clustering and choice of m


def _excess(A: np.ndarray) -> np.ndarray:
    """A minus its mean off-diagonal entry, with a zero diagonal: positive = more helpful than a typical pair."""
    n = A.shape[0]
    off = ~np.eye(n, dtype=bool)
    E = A - (A[off].mean() if n > 1 else 0.0)
    np.fill_diagonal(E, 0.0)
    return E


def positive_affinity(A: np.ndarray) -> np.ndarray:
    """Graph weights for spectral methods: W = max(A - mean offdiag(A), 0), zero diagonal.

    Graph methods need W ≥ 0, and a plain shift (A - min A) leaves a dense background that swamps block
    structure (the normalized spectrum then always shows its largest gap after λ1); keeping only
    above-average pairs sparsifies it so m blocks give m eigenvalues near 1.
    """
    return np.maximum(_excess(_check_symmetric(A)), 0.0)


def _normalized_affinity(W: np.ndarray) -> np.ndarray:
    d = W.sum(axis=1)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)  # isolated nodes: zero row
    return W * inv[:, None] * inv[None, :]


def spectral_cluster(A: np.ndarray, m: int, *, seed: int = 0) -> np.ndarray:
    """Ng-Jordan-Weiss spectral clustering on positive_affinity(A): top-m eigenvectors of D^-1/2 W D^-1/2,
    rows normalized to unit length, k-means. Returns canonical labels with every group non-empty."""
    A = _check_symmetric(A)
    n = A.shape[0]
    m = _check_m(m, n)
    if m == 1:
        return np.zeros(n, dtype=int)
    if m == n:
        return np.arange(n)
    with threadpool_limits(limits=1, user_api="blas"):
        _, V = np.linalg.eigh(_normalized_affinity(positive_affinity(A)))
    E = V[:, -m:]
    E = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
    return canonical_labels(_fill_empty(A, _kmeans(E, m, seed), m))


def excess_score(A: np.ndarray, labels: np.ndarray) -> float:
    """Within-group affinity above the mean pair, Σ_{g} Σ_{i≠j∈g} (A_ij - μ), over Σ_{i≠j} |A_ij - μ|.

    Modularity with a constant null model: merging two real groups adds below-average pairs and splitting
    one drops above-average pairs, so both lower the score; it lies in [-1, 1] and is shift/scale-free.
    """
    A = _check_symmetric(A)
    lab = np.asarray(labels)
    if lab.shape != (A.shape[0],):
        raise ValueError(f"labels must have length n={A.shape[0]}, got shape {lab.shape}")
    E = _excess(A)
    total = np.abs(E).sum()
    return float(E[lab[:, None] == lab[None, :]].sum() / total) if total > 0 else 0.0


def choose_m(
    A: np.ndarray,
    m_range: Iterable[int],
    method: ChooseMethod = "excess",
    *,
    clusterer: Literal["sdp", "spectral"] = "sdp",
    seed: int = 0,
) -> tuple[int, pd.DataFrame]:
    """Pick the number of groups; returns (m, per-m table whose `score` column is maximized).

    - "excess" (default): cluster A into m groups for every m (sdp_cluster or spectral_cluster) and score
      each partition by excess_score. Costs one clustering per m. It does not detect "no structure": an
      optimized split of pure noise still scores > 0, so m = 1 is essentially never chosen.
    - "eigengap": score(m) = λ_m - λ_{m+1} of D^-1/2 W D^-1/2, W = positive_affinity(A): m well-separated
      blocks give m eigenvalues near 1 then a drop. One eigendecomposition; with 1 in m_range it answers
      m = 1 on structureless data, but at high noise it misses the planted m more often than "excess"
      (planted blocks of 2-50 datasets, noise up to 0.8 of the block signal, m_range from 2: 51/63 vs 54/63).
    Ties go to the smallest m (fewer adapters to train).
    """
    A = _check_symmetric(A)
    n = A.shape[0]
    ms = sorted({_check_m(m, n) for m in m_range})
    if not ms:
        raise ValueError("m_range is empty")
    rows: list[dict[str, float]] = []
    if method == "eigengap":
        if ms[-1] >= n:
            raise ValueError(f"eigengap needs m < n={n}, got m={ms[-1]}")
        lam = np.sort(np.linalg.eigvalsh(_normalized_affinity(positive_affinity(A))))[::-1]
        rows = [{"m": m, "lambda_m": lam[m - 1], "lambda_next": lam[m], "score": lam[m - 1] - lam[m]} for m in ms]
    elif method == "excess":
        if clusterer not in ("sdp", "spectral"):
            raise ValueError(f"clusterer must be 'sdp' or 'spectral', got {clusterer!r}")
        for m in ms:
            labels = sdp_cluster(A, m, seed=seed).labels if clusterer == "sdp" else spectral_cluster(A, m, seed=seed)
            rows.append({"m": m, "objective": partition_objective(A, labels), "score": excess_score(A, labels)})
    else:
        raise ValueError(f"method must be 'excess' or 'eigengap', got {method!r}")
    table = pd.DataFrame(rows)
    best = int(table["m"].iloc[int(np.argmax(table["score"].to_numpy()))])  # argmax takes the first tie
    return best, table


def adjusted_rand_index(a: Iterable[int], b: Iterable[int]) -> float:
    """Hubert–Arabie adjusted Rand index of two labelings of the same items: 1 for the same partition (any
    label names), about 0 for independent ones, negative below chance. Two trivial partitions that agree (all in
    one group, or all apart) give 1."""
    x, y = np.asarray(list(a)), np.asarray(list(b))
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"labelings must be 1-D and of the same length, got shapes {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError("the adjusted Rand index needs at least 2 items")
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    C = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(C, (xi, yi), 1)
    pairs = lambda v: float((v * (v - 1) / 2).sum())  # noqa: E731  # Σ C(v, 2)
    both, sa, sb = pairs(C), pairs(C.sum(1)), pairs(C.sum(0))
    expected = sa * sb / (x.size * (x.size - 1) / 2)
    top = (sa + sb) / 2
    return 1.0 if top == expected else float((both - expected) / (top - expected))


@dataclass
class Partition:
    """Datasets grouped from a task-affinity matrix T (target i, source j): what `partition_datasets` returns."""

    names: list[str]
    labels: np.ndarray  # group index per name
    groups: list[list[str]]
    A: np.ndarray  # the symmetrized affinity that was clustered
    method: str
    normalize: str
    objective: float  # partition_objective(A, labels)
    m_scores: pd.DataFrame | None  # choose_m's table (None when m was given)
    sdp: SdpResult | None = None  # the SDP solve (relaxed objective, certified bound); None for spectral

    @property
    def m(self) -> int:
        return len(self.groups)

    def group_of(self, name: str) -> int:
        return int(self.labels[self.names.index(name)])


def partition_datasets(T: np.ndarray, names: list[str], *, m: int = 0, max_m: int = 4,
                       method: Literal["sdp", "spectral"] = "sdp", normalize: Normalize = "row_zscore",
                       seed: int = 0) -> Partition:
    """Symmetrize T, choose the number of groups (m = 0: choose_m over 2..min(max_m, n − 1)) and cluster."""
    A = symmetrize(T, normalize=normalize)
    n = len(names)
    if A.shape[0] != n:
        raise ValueError(f"T is {A.shape[0]}x{A.shape[0]} for {n} names")
    scores = None
    if m > 0:
        m = min(m, n)
    else:
        m, scores = choose_m(A, range(2, max(2, min(max_m, n - 1)) + 1), clusterer=method, seed=seed)
    sdp = sdp_cluster(A, m, seed=seed) if method == "sdp" else None
    labels = sdp.labels if sdp is not None else spectral_cluster(A, m, seed=seed)
    groups = [[names[i] for i in np.flatnonzero(labels == g)] for g in range(m)]
    return Partition(list(names), labels, groups, A, method, normalize, partition_objective(A, labels), scores, sdp)


__all__ = [
    "Partition",
    "SdpResult",
    "adjusted_rand_index",
    "brute_force_partition",
    "canonical_labels",
    "choose_m",
    "excess_score",
    "positive_affinity",
    "partition_matrix",
    "partition_datasets",
    "partition_objective",
    "sdp_cluster",
    "spectral_cluster",
    "symmetrize",
]
