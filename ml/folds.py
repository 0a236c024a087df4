"""Validation split into two folds, so that nothing is fit on the examples that judge it.

* selection fold: chooses checkpoints (best epoch), boosting rounds (kept only if its loss drops), λ and the
  partition (the estimator scores it);
* weights fold: fits the ensemble weights, and nothing else.

Test examples are only ever reported. The split is deterministic (a seed), label-stratified (each fold gets
about the same label mix), and depends only on the labels in their order, so every process that reads the
same validation rows draws the same folds.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

SELECT, WEIGHTS = "select", "weights"
T = TypeVar("T")


def weights_fold_mask(labels: Sequence[int] | np.ndarray, *, weights_share: float = 0.5, seed: int = 0) -> np.ndarray:
    """(N,) bool: True for the rows of the weights fold, False for the selection fold.

    Per label, a seeded shuffle of its rows; the first round(share · count) go to the weights fold, keeping at
    least one row in each fold for a label with two or more rows (a single row goes to selection).
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if not 0.0 < weights_share < 1.0:
        raise ValueError(f"weights_share must be in (0, 1), got {weights_share}")
    mask = np.zeros(len(y), dtype=bool)
    rng = np.random.default_rng([seed, len(y)])
    for lab in sorted(set(y.tolist())):
        rows = np.flatnonzero(y == lab)
        rows = rows[rng.permutation(len(rows))]
        k = int(round(weights_share * len(rows)))
        if len(rows) >= 2:
            k = min(max(k, 1), len(rows) - 1)
        else:
            k = 0
        mask[rows[:k]] = True
    return mask


def split_validation(items: Sequence[T], labels: Sequence[int] | np.ndarray, *, weights_share: float = 0.5,
                     seed: int = 0) -> tuple[list[T], list[T]]:
    """(selection fold, weights fold) of `items` (one per label, in order; each fold keeps the order)."""
    if len(items) != len(labels):
        raise ValueError(f"{len(items)} items but {len(labels)} labels")
    mask = weights_fold_mask(labels, weights_share=weights_share, seed=seed)
    return [x for x, m in zip(items, mask) if not m], [x for x, m in zip(items, mask) if m]
