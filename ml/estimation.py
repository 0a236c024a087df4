"""First-order (GradEx) estimates of fine-tuning on many subsets of datasets at once.

Every training example x has f0(x), the base model's log-odds of its gold label, and a projected gradient
feature g(x) in R^d. Fine-tuning on a subset S of datasets is estimated by

    w_S = argmin_w  (1/N_S) sum_{x in train(S)} log(1 + exp(-(f0(x) + g(x)^T w)))  +  lam ||w||^2

and every dataset's validation examples are then scored under the linearized model f = f0 + g^T w_S:
est_loss = mean log(1 + exp(-f)), est_accuracy = mean(f > 0) (gold label has p > 0.5), est_margin = mean f.

How all subsets are solved at once (see `solve_subsets`):

* Exact per-dataset statistics, computed once. At w = 0 the Hessian, gradient and loss of every subset are sums
  of per-dataset terms: C_i = G_i^T diag(s(1-s)) G_i with s = sigmoid(f0_i), G_i^T (s - 1), sum softplus(-f0_i).
  So P_S = sum_{i in S} C_i / N_S + 2 lam I is the *exact* Hessian of subset S at w = 0, and the first Newton
  step -P_S^{-1} grad_S(0) costs no pass over the data at all.
* P_S (Cholesky, explicit inverse, batched over subsets) is then the metric of a batched L-BFGS: the initial
  inverse-Hessian is c_k P_S^{-1}, with c_k = s^T P_S s / s^T y re-estimated every step (s^T P_S s is again a sum
  of per-dataset terms, so it is a tiny GEMM against the d x d matrices C_i). We tried preconditioned Newton-CG
  with the same P_S: on our synthetic suites it needed 2-3x more data passes and preconditioner applications
  (each CG step needs both) than this L-BFGS, and the applications (memory-bound, K d^2) dominate the time.
* Margins of all subsets come from per-dataset GEMMs over only the subsets that contain the dataset, so a data
  pass costs sum_S |S| n d, not n_datasets x K. Margins are linear in w, so the Armijo line search re-uses the
  direction's margins G p and never touches G again; each iteration is exactly two data passes (G p, G^T r).
* Margins, gradients, losses and the stopping test are float64: the data are float32, but a 1e-7 relative
  objective gap needs double sums. Only the stored P_S^{-1} is float32 (applying it is memory-bound, and a
  preconditioner only steers the search). Subsets run in chunks (setup memory ~ chunk_size d^2 12 bytes);
  converged subsets leave the working set.

Convergence: per subset, ||grad||_2 <= tol. The objective is 2 lam-strongly convex, so the gap to the optimum is
at most ||grad||^2 / (4 lam) (2.5e-10 for the defaults tol=1e-6, lam=1e-3).

W (K, d) is returned as-is (row k: subset k's w, e.g. for a forward-mode check); mapping w back to LoRA
weights (unprojecting) lives elsewhere.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .subsets import Subset

F = torch.nn.functional
_f64 = torch.float64
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": None}  # test: ignored


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Split:
    """One dataset's split: f0 (n,) float64 base log-odds of the gold label, G (n, d) float32 features."""

    f0: np.ndarray
    G: np.ndarray

    @property
    def n(self) -> int:
        return len(self.f0)


@dataclass(frozen=True)
class FeatureSet:
    """Per-dataset train and validation features. A dataset may lack one split (no train: cannot be in a
    subset; no validation: its scores are NaN)."""

    train: Mapping[str, Split]
    val: Mapping[str, Split]
    names: tuple[str, ...] = field(init=False)
    d: int = field(init=False)

    def __post_init__(self) -> None:
        train = {str(k): _as_split(v, f"train[{k!r}]") for k, v in self.train.items()}
        val = {str(k): _as_split(v, f"val[{k!r}]") for k, v in self.val.items()}
        dims = {s.G.shape[1] for s in [*train.values(), *val.values()]}
        if not dims:
            raise ValueError("FeatureSet has no datasets")
        if len(dims) > 1:
            by = {f"{sp}:{k}": s.G.shape[1] for sp, dd in (("train", train), ("val", val)) for k, s in dd.items()}
            raise ValueError(f"mismatched feature dimension d across datasets: {by}")
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "val", val)
        object.__setattr__(self, "names", tuple(sorted(set(train) | set(val))))
        object.__setattr__(self, "d", dims.pop())

    @classmethod
    def from_arrays(cls, train: Mapping[str, tuple], val: Mapping[str, tuple]) -> "FeatureSet":
        """From {dataset: (f0, G)} dicts."""
        return cls({k: Split(*v) for k, v in train.items()}, {k: Split(*v) for k, v in val.items()})

    @classmethod
    def from_frame(cls, df: pd.DataFrame, features: np.ndarray | None = None) -> "FeatureSet":
        """From a frame with columns dataset, split ('train' | 'val'/'validation'; 'test' rows are ignored), f0,
        features.

        features: each cell a 1-D array/list of length d; or pass a 2-D array (len(df), d) as `features`
        (then the column is not needed). Row order within a dataset and split is kept.
        """
        need = ["dataset", "split", "f0"] + ([] if features is not None else ["features"])
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise ValueError(f"feature frame is missing columns {missing}; has {list(df.columns)}")
        if features is None:
            cells = df["features"].tolist()
            lens = {np.asarray(c).reshape(-1).shape[0] for c in cells}
            if len(lens) > 1:
                raise ValueError(f"mismatched feature dimension d across rows: lengths {sorted(lens)}")
            X = np.stack([np.asarray(c, dtype=np.float32).reshape(-1) for c in cells]) if cells else None
        else:
            X = np.asarray(features, dtype=np.float32)
            if X.ndim != 2 or X.shape[0] != len(df):
                raise ValueError(f"features must be a 2-D array with {len(df)} rows, got shape {X.shape}")
        if X is None:
            raise ValueError("feature frame is empty")
        split = df["split"].astype(str).str.lower()
        bad = sorted(set(split) - set(_SPLITS))
        if bad:
            raise ValueError(f"unknown split values {bad}; expected one of {sorted(_SPLITS)}")
        split = split.map(_SPLITS).to_numpy()
        dataset = df["dataset"].astype(str).to_numpy()
        f0 = df["f0"].to_numpy(dtype=np.float64)
        out: dict[str, dict[str, Split]] = {"train": {}, "val": {}}
        groups = pd.DataFrame({"d": dataset, "s": split}).groupby(["d", "s"], sort=False, dropna=True).indices
        for (name, sp), rows in groups.items():
            out[sp][name] = Split(f0[rows], X[rows])
        return cls(out["train"], out["val"])


def _as_split(s: Split | tuple, where: str) -> Split:
    f0, G = (s.f0, s.G) if isinstance(s, Split) else s
    f0 = np.ascontiguousarray(f0, dtype=np.float64)
    G = np.ascontiguousarray(G, dtype=np.float32)
    if f0.ndim != 1 or G.ndim != 2 or G.shape[0] != f0.shape[0] or G.shape[1] == 0:
        raise ValueError(f"{where}: need f0 (n,) and G (n, d>0), got {f0.shape} and {G.shape}")
    if not (np.isfinite(f0).all() and np.isfinite(G).all()):
        raise ValueError(f"{where}: f0 and G must be finite")
    return Split(f0, G)


def _as_subsets(subsets: Sequence[Subset | Sequence[str]]) -> list[Subset]:
    """Subsets, or plain lists of names; a bare string is a one-dataset subset (not its characters)."""
    if isinstance(subsets, (str, Subset)):
        raise TypeError("subsets must be a list of Subset or of lists of dataset names")
    return [s if isinstance(s, Subset) else Subset.of([s] if isinstance(s, str) else s) for s in subsets]


def _member_rows(features: FeatureSet, subsets: list[Subset]) -> list[list[int]]:
    """Subset -> positions (in features.names) of its members; every member must have training rows."""
    pos = {n: i for i, n in enumerate(features.names)}
    unknown = sorted({m for s in subsets for m in s.members if m not in pos})
    if unknown:
        raise ValueError(f"subsets name datasets that are not in the feature set: {unknown}")
    no_train = sorted({m for s in subsets for m in s.members if m not in features.train or features.train[m].n == 0})
    if no_train:
        raise ValueError(f"subsets name datasets without training examples: {no_train}")
    return [[pos[m] for m in s.members] for s in subsets]


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads for one call, restored after. On a busy small CPU one thread can beat two: the
    solver issues many mid-sized ops, and each parallel region waits for its slowest (descheduled) thread."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)):
        raise TypeError(f"lam must be a number, got {lam!r}")
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be finite and > 0 (the L2 term keeps the optimum finite), got {lam}")
    return float(lam)


# ------------------------------------------------------------------------------------------- objective


def objective(features: FeatureSet, subset: Subset | Sequence[str], w: np.ndarray, lam: float) -> float:
    """The exact objective of `subset` at w, in float64 numpy (independent of the batched solver)."""
    lam = _check_lam(lam)
    (s,) = _as_subsets([subset])
    _member_rows(features, [s])
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (features.d,):
        raise ValueError(f"w must have shape ({features.d},), got {w.shape}")
    f0 = np.concatenate([features.train[m].f0 for m in s.members])
    G = np.concatenate([features.train[m].G for m in s.members]).astype(np.float64)
    return float(np.logaddexp(0.0, -(f0 + G @ w)).mean() + lam * (w @ w))


# ----------------------------------------------------------------------------------------------- solver


@dataclass
class FitResult:
    """W (K, d) and per-subset diagnostics; iterations counts L-BFGS steps (0: w = 0 already met tol)."""

    W: np.ndarray
    iterations: np.ndarray
    grad_norm: np.ndarray
    objective: np.ndarray
    converged: np.ndarray
    data_passes: int  # GEMM sweeps over the members' training rows, summed over chunks
    seconds: float


class _Data:
    """Per-dataset training tensors and exact statistics at w = 0, built once per fit."""

    def __init__(self, features: FeatureSet, used: list[int]):
        self.G: dict[int, torch.Tensor] = {}
        self.f0: dict[int, torch.Tensor] = {}
        self.C: dict[int, torch.Tensor] = {}  # G^T diag(s(1-s)) G: Hessian sum at w = 0
        self.g0: dict[int, torch.Tensor] = {}  # G^T (s - 1): gradient sum at w = 0
        self.l0: dict[int, float] = {}  # sum softplus(-f0): loss sum at w = 0
        for j in used:
            sp = features.train[features.names[j]]
            G = torch.from_numpy(sp.G).to(_f64)
            f0 = torch.from_numpy(sp.f0)
            s = torch.sigmoid(f0)
            self.G[j], self.f0[j] = G, f0
            self.C[j] = G.T @ ((s * (1 - s))[:, None] * G)
            self.g0[j] = G.T @ (s - 1)
            self.l0[j] = float(F.softplus(-f0).sum())


class _Chunk:
    """Working set of subsets solved together. Rows are subsets; `ks[j]` lists the rows containing dataset j,
    and M[j] (n_j, len(ks[j])) holds those subsets' current margins on dataset j."""

    def __init__(self, data: _Data, members: list[list[int]], lam: float, d: int):
        self.data, self.lam = data, lam
        K = len(members)
        rows: dict[int, list[int]] = {}
        for k, ms in enumerate(members):
            for j in ms:
                rows.setdefault(j, []).append(k)
        self.ks = {j: torch.tensor(r) for j, r in rows.items()}
        used = list(self.ks)
        A = torch.zeros(K, len(used), dtype=_f64)  # membership: subset row x dataset
        for c, j in enumerate(used):
            A[self.ks[j], c] = 1.0
        self.N = A @ torch.tensor([float(data.G[j].shape[0]) for j in used], dtype=_f64)
        self.loss = A @ torch.tensor([data.l0[j] for j in used], dtype=_f64) / self.N
        self.grad = A @ torch.stack([data.g0[j] for j in used]) / self.N[:, None]
        self.W = torch.zeros(K, d, dtype=_f64)
        self.M = {j: data.f0[j][:, None].expand(-1, len(k)).clone() for j, k in self.ks.items()}
        self.passes = 0

        # P_k = exact Hessian at w = 0, factorized once and kept as an explicit inverse (a batched matvec is the
        # cheapest way to apply it). float32: applying it is memory-bound and a preconditioner only steers the
        # search; gradients, margins and the stopping test stay float64. Rows where float32 is not safe
        # (Cholesky fails, or 2 lam tiny against the curvature) are redone in float64.
        self.Pinv, failed = self._inverse_hessians(A, self.N, used, torch.float32)
        diag = torch.stack([data.C[j].diagonal() for j in used])
        risky = failed | (2 * lam < 1e-5 * (A @ diag).amax(1) / self.N)
        if risky.any():
            r = risky.nonzero().squeeze(1)
            Pinv, failed = self._inverse_hessians(A[r], self.N[r], used, _f64)
            if failed.any():
                raise FloatingPointError(f"lam={lam:g} is too small for these features: singular Hessian in float64")
            self.Pinv[r] = Pinv.to(torch.float32)

    def _inverse_hessians(self, A: torch.Tensor, N: torch.Tensor, used: list[int], dtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverses of P_k = sum_{j in k} C_j / N_k + 2 lam I, and which rows' Cholesky failed."""
        d = self.W.shape[1]
        C = torch.stack([self.data.C[j].to(dtype) for j in used])
        if len(used) <= 64 * A.sum(1).mean():
            P = (A.to(dtype) @ C.view(len(used), -1)).view(len(A), d, d)  # one GEMM writes each block once
        else:  # the chunk touches far more datasets than a subset has members: scatter-add instead
            P = torch.zeros(len(A), d, d, dtype=dtype)
            for c in range(len(used)):
                k = A[:, c].nonzero().squeeze(1)
                P.index_add_(0, k, C[c].expand(len(k), d, d))
        P /= N.to(dtype)[:, None, None]
        P.diagonal(dim1=1, dim2=2).add_(2 * self.lam)
        L, info = torch.linalg.cholesky_ex(P)
        del P
        return torch.cholesky_inverse(L), info > 0

    def prec(self, r: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        Pinv = self.Pinv if rows is None else self.Pinv[rows]
        return torch.bmm(Pinv, r.to(torch.float32).unsqueeze(2)).squeeze(2).to(_f64)

    def sPs(self, s: torch.Tensor) -> torch.Tensor:
        """s_k^T P_k s_k from the per-dataset C_j (d x d GEMMs, no data pass)."""
        out = torch.zeros(len(s), dtype=_f64)
        for j, k in self.ks.items():
            sk = s[k]
            out.index_add_(0, k, ((sk @ self.data.C[j]) * sk).sum(1))
        return out / self.N + 2 * self.lam * (s * s).sum(1)

    def dir_margins(self, p: torch.Tensor) -> dict[int, torch.Tensor]:
        self.passes += 1
        return {j: self.data.G[j] @ p[k].T for j, k in self.ks.items()}

    def loss_at(self, Q: dict[int, torch.Tensor], t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        L = torch.zeros(len(t), dtype=_f64)
        for j, k in self.ks.items():
            L.index_add_(0, k, F.softplus(-(self.M[j] + t[k] * Q[j])).sum(0))
        w = self.W + t[:, None] * p
        return L / self.N + self.lam * (w * w).sum(1)

    def step(self, Q: dict[int, torch.Tensor], t: torch.Tensor, p: torch.Tensor, loss: torch.Tensor) -> None:
        """Move to W + t p (margins update exactly: they are linear in w) and recompute the gradient."""
        for j, k in self.ks.items():
            self.M[j] += t[k] * Q[j]
        self.W += t[:, None] * p
        self.loss = loss
        self.passes += 1
        g = torch.zeros_like(self.W)
        for j, k in self.ks.items():
            g.index_add_(0, k, (-torch.sigmoid(-self.M[j])).T @ self.data.G[j])
        self.grad = g / self.N[:, None] + 2 * self.lam * self.W

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every subset not in `rows` (sorted working-row indices) from the working set."""
        remap = torch.full((len(self.W),), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(rows))
        ks, M = {}, {}
        for j, k in self.ks.items():
            cols = (remap[k] >= 0).nonzero().squeeze(1)
            if len(cols):
                ks[j], M[j] = remap[k[cols]], self.M[j][:, cols]
        self.ks, self.M = ks, M
        for name in ("Pinv", "N", "W", "loss", "grad"):
            setattr(self, name, getattr(self, name)[rows])


def _lbfgs(ch: _Chunk, tol: float, max_iter: int, memory: int, out: dict[str, np.ndarray], ids: np.ndarray) -> None:
    """Batched, P-preconditioned L-BFGS with Armijo backtracking on all subsets of a chunk; writes into out."""
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, rho) per step, rows = subsets
    c = torch.ones(len(ch.W), dtype=_f64)  # scale of the initial inverse Hessian c P^{-1}
    iters = torch.zeros(len(ch.W), dtype=torch.long)
    stalled = torch.zeros(len(ch.W), dtype=torch.bool)

    def finish(rows: torch.Tensor) -> None:
        r = ids[rows.numpy()]
        out["W"][r] = ch.W[rows].numpy()
        out["iterations"][r] = iters[rows].numpy()
        out["grad_norm"][r] = ch.grad[rows].norm(dim=1).numpy()
        out["objective"][r] = ch.loss[rows].numpy()

    for it in range(max_iter + 1):
        done = (ch.grad.norm(dim=1) <= tol) | stalled
        if it == max_iter or done.all():
            break
        if done.float().mean() >= 0.25:  # shrink the working set: converged subsets cost nothing more
            finish(done.nonzero().squeeze(1))
            keep = (~done).nonzero().squeeze(1)
            ch.keep(keep)
            hist = [(s[keep], y[keep], rho[keep]) for s, y, rho in hist]
            c, iters, stalled, ids = c[keep], iters[keep], stalled[keep], ids[keep.numpy()]
            done = done[keep]
        live = (~done).to(_f64)[:, None]

        # Two-loop recursion with initial inverse Hessian c P^{-1}.
        q = ch.grad.clone()
        alphas = []
        for s, y, rho in reversed(hist):
            a = rho * (s * q).sum(1)
            alphas.append(a)
            q -= a[:, None] * y
        r = ch.prec(q) * c[:, None]
        for (s, y, rho), a in zip(hist, reversed(alphas)):
            r += (a - rho * (y * r).sum(1))[:, None] * s
        p = -r * live
        gtp = (ch.grad * p).sum(1)
        bad = (gtp >= 0) & ~done  # lost descent (numerics): restart those rows from the preconditioned gradient
        if bad.any():
            b = bad.nonzero().squeeze(1)
            p[b] = -ch.prec(ch.grad[b], b)
            p[b] = torch.where(((ch.grad[b] * p[b]).sum(1) < 0)[:, None], p[b], -ch.grad[b])  # last resort: -grad
            gtp = (ch.grad * p).sum(1)
            hist = [(s, y, rho.masked_fill(bad, 0.0)) for s, y, rho in hist]

        # Armijo backtracking on exact margins M + t G p (one GEMM for G p, then elementwise only).
        Q = ch.dir_margins(p)
        t = torch.ones(len(p), dtype=_f64)
        slack = 1e-13 * ch.loss.abs()  # float64 noise floor of the loss sums
        for _ in range(60):
            new = ch.loss_at(Q, t, p)
            fail = new > ch.loss + 1e-4 * t * gtp + slack
            if not fail.any():
                break
            t = torch.where(fail, t * 0.5, t)
        else:
            t = torch.where(fail, torch.zeros_like(t), t)  # no decrease found: at the noise floor
            stalled |= fail
            new = torch.where(fail, ch.loss, new)
        g_old, W_old = ch.grad, ch.W.clone()
        ch.step(Q, t, p, new)
        iters += (~done).long()

        s, y = ch.W - W_old, ch.grad - g_old
        sy = (s * y).sum(1)
        ok = sy > 1e-12 * s.norm(dim=1) * y.norm(dim=1)
        rho = torch.where(ok, 1.0 / torch.where(ok, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        c = torch.where(ok, ch.sPs(s) * rho, c)
        hist.append((s, y, rho))
        if len(hist) > memory:
            hist.pop(0)
    finish(torch.arange(len(ch.W)))


def solve_subsets(
    features: FeatureSet,
    subsets: Sequence[Subset | Sequence[str]],
    *,
    lam: float = 1e-3,
    tol: float = 1e-6,
    max_iter: int = 100,
    chunk_size: int = 1024,
    memory: int = 16,
    threads: int | None = None,
) -> FitResult:
    """Solve every subset's regularized logistic problem; W[k] is subset k's w. See the module docstring.

    tol: a subset stops at ||grad||_2 <= tol, so its objective is within tol^2 / (4 lam) of the optimum; with a
    weak lam and a tiny objective, pass a smaller tol for a small *relative* gap (weak lam also needs more
    iterations: w* moves far from the w = 0 metric). chunk_size: subsets solved together (setup memory about
    chunk_size d^2 12 bytes); memory: L-BFGS pairs kept; threads: torch threads for this call, restored after
    (None: torch's setting; on a busy shared CPU, 1, or OMP_WAIT_POLICY=PASSIVE, avoids spin-wait stalls).
    Subsets that stop short of tol are reported in `converged` and with a RuntimeWarning.
    """
    lam = _check_lam(lam)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be finite and > 0, got {tol!r}")
    for arg, val in (("max_iter", max_iter), ("chunk_size", chunk_size), ("memory", memory)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {val!r}")
    t0 = time.perf_counter()
    subs = _as_subsets(subsets)
    members = _member_rows(features, subs)
    K, d = len(subs), features.d
    out = {
        "W": np.zeros((K, d)),
        "iterations": np.zeros(K, dtype=np.int64),
        "grad_norm": np.zeros(K),
        "objective": np.zeros(K),
    }
    passes = 0
    if K:
        with torch.no_grad(), _threads(threads):
            data = _Data(features, sorted({j for ms in members for j in ms}))
            for a in range(0, K, chunk_size):
                ch = _Chunk(data, members[a : a + chunk_size], lam, d)
                _lbfgs(ch, tol, max_iter, memory, out, np.arange(a, min(a + chunk_size, K)))
                passes += ch.passes
    converged = out["grad_norm"] <= tol
    if not converged.all():
        warnings.warn(
            f"{int((~converged).sum())} of {K} subsets did not reach ||grad|| <= {tol:g} "
            f"(worst {out['grad_norm'].max():.3g}); raise max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return FitResult(converged=converged, data_passes=passes, seconds=time.perf_counter() - t0, **out)


def fit_subsets(
    features: FeatureSet,
    subsets: Sequence[Subset | Sequence[str]],
    *,
    lam: float = 1e-3,
    tol: float = 1e-6,
    max_iter: int = 100,
    **kw,
) -> np.ndarray:
    """W (K, d) float64: row k minimizes subset k's objective. kw: chunk_size, memory, threads (solve_subsets)."""
    return solve_subsets(features, subsets, lam=lam, tol=tol, max_iter=max_iter, **kw).W


# ------------------------------------------------------------------------------------------------ score


def score(
    features: FeatureSet,
    subsets: Sequence[Subset | Sequence[str]],
    W: np.ndarray,
    *,
    chunk_size: int = 512,
    threads: int | None = None,
) -> pd.DataFrame:
    """Score every dataset's validation split under every subset's w.

    One row per (subset, dataset) for EVERY dataset in the feature set, subsets in the given order and datasets
    sorted by name: subset_id, members (list[str], a fresh list per row), kind, dataset, in_subset, est_loss,
    est_accuracy (mean f > 0), est_margin (mean f), n_val. Datasets without validation rows get NaN estimates.
    """
    subs = _as_subsets(subsets)
    _member_rows(features, subs)
    W = np.asarray(W, dtype=np.float64)
    if W.shape != (len(subs), features.d):
        raise ValueError(f"W must have shape ({len(subs)}, {features.d}), got {W.shape}")
    names = features.names
    pos = {n: i for i, n in enumerate(names)}
    nd, K = len(names), len(subs)
    n_val = np.array([features.val[n].n if n in features.val else 0 for n in names])
    stats = np.full((3, K, nd), np.nan)
    with_val = [n for n in names if n in features.val and features.val[n].n > 0]
    if with_val and K:
        f0 = torch.from_numpy(np.concatenate([features.val[n].f0 for n in with_val]))
        G = torch.from_numpy(np.concatenate([features.val[n].G for n in with_val])).to(_f64)
        which = torch.from_numpy(np.repeat([pos[n] for n in with_val], [features.val[n].n for n in with_val]))
        cnt = torch.from_numpy(n_val).to(_f64).clamp_min(1)[:, None]
        with torch.no_grad(), _threads(threads):
            for a in range(0, K, chunk_size):
                Wc = torch.from_numpy(W[a : a + chunk_size])
                M = torch.addmm(f0[:, None], G, Wc.T)  # (n_val_total, k) margins under each subset's w
                for i, v in enumerate((F.softplus(-M), (M > 0).to(_f64), M)):
                    acc = torch.zeros(nd, len(Wc), dtype=_f64).index_add_(0, which, v)
                    stats[i, a : a + len(Wc)] = (acc / cnt).T.numpy()
        stats[:, :, n_val == 0] = np.nan
    inside = np.zeros((K, nd), dtype=bool)
    members = np.empty(K, dtype=object)  # 1-D array of tuples (np.array would make equal-size ones 2-D)
    for k, s in enumerate(subs):
        inside[k, [pos[m] for m in s.members]] = True
        members[k] = s.members
    return pd.DataFrame(
        {
            "subset_id": np.repeat([s.id for s in subs], nd),
            "members": list(map(list, np.repeat(members, nd))),  # a fresh list per row
            "kind": np.repeat([s.kind for s in subs], nd),
            "dataset": np.tile(np.array(names, dtype=object), K),
            "in_subset": inside.reshape(-1),
            "est_loss": stats[0].reshape(-1),
            "est_accuracy": stats[1].reshape(-1),
            "est_margin": stats[2].reshape(-1),
            "n_val": np.tile(n_val, K),
        }
    )


def estimate_subsets(features: FeatureSet, subsets: Sequence[Subset | Sequence[str]], *,
                     lam: float) -> tuple[pd.DataFrame, FitResult]:
    """The pipeline's estimation step (the subset_estimates asset; benchmarks/chain.py): every subset's w at λ and
    every dataset scored under it, as (score's table with mode 'linearized', the fit)."""
    subs = _as_subsets(subsets)
    fit = solve_subsets(features, subs, lam=lam)
    table = score(features, subs, fit.W)
    table["mode"] = "linearized"
    return table, fit


def estimate(features: FeatureSet, subsets: Sequence[Subset | Sequence[str]], **kw) -> pd.DataFrame:
    """fit_subsets + score. kw go to fit_subsets (lam, tol, max_iter, chunk_size, memory, threads)."""
    subs = _as_subsets(subsets)
    return score(features, subs, fit_subsets(features, subs, **kw), threads=kw.get("threads"))


# ------------------------------------------------------------------------------------------- synthetic


def synthetic_features(
    n_datasets: int = 10,
    n_train: int = 500,
    n_val: int = 100,
    d: int = 200,
    *,
    n_clusters: int = 3,
    rank: int = 4,
    signal: float = 0.5,
    scale: float = 1.0,
    seed: int = 0,
) -> FeatureSet:
    """Seeded features that resemble real ones: f0 ~ N(0.3, 1); g = a * v_i + z B_c + noise, where dataset i
    of task cluster c has a helpful direction v_i (mostly its cluster's), a ~ N(signal, 0.7) per example, and a
    rank-`rank` nuisance component B_c shared by the cluster. Same-cluster datasets help each other; others
    barely do, so subsets differ. Names: ds000, ds001, ..."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n_clusters, d)) / math.sqrt(d)
    B = rng.standard_normal((n_clusters, rank, d)) / math.sqrt(d)
    train, val = {}, {}
    for i in range(n_datasets):
        c = i % n_clusters
        v = 0.7 * U[c] + 0.3 * rng.standard_normal(d) / math.sqrt(d)

        def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
            f0 = rng.normal(0.3, 1.0, n)
            a = rng.normal(signal, 0.7, n)
            g = a[:, None] * v + rng.standard_normal((n, rank)) @ B[c] + rng.standard_normal((n, d)) / math.sqrt(d)
            return f0, (scale * g).astype(np.float32)

        name = f"ds{i:03d}"
        train[name], val[name] = draw(n_train), draw(n_val)
    return FeatureSet.from_arrays(train, val)
