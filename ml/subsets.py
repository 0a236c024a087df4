"""Subsets of datasets to estimate: every singleton, every pair, and K random subsets of size k.

A subset's id is a hash of its sorted member names, so the same members get the same id in any process,
in any order, on any machine; results from different runs join on it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from itertools import combinations
from typing import Iterable, Literal

import numpy as np

Kind = Literal["singleton", "pair", "random"]
KINDS: tuple[str, ...] = ("singleton", "pair", "random")
_SEP = "\x1f"  # ASCII unit separator: cannot collide with a comma or space inside a dataset name


def subset_id(members: Iterable[str]) -> str:
    """'s_' + first 12 hex digits of sha256 over the sorted, unit-separator-joined member names."""
    key = _SEP.join(sorted(members))
    return "s_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Subset:
    """A set of dataset names to fine-tune on together. members are sorted and unique."""

    id: str
    members: tuple[str, ...]
    kind: Kind

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a subset needs at least one member")
        if any(not isinstance(m, str) or not m for m in self.members):
            raise ValueError(f"subset members must be non-empty strings, got {self.members!r}")
        if tuple(sorted(set(self.members))) != self.members:
            raise ValueError(f"subset members must be sorted and unique, got {self.members!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.id != subset_id(self.members):
            raise ValueError(f"id {self.id!r} does not match members {self.members!r}")

    @classmethod
    def of(cls, members: Iterable[str], kind: Kind | None = None) -> "Subset":
        """Build from any iterable of names; kind defaults to singleton/pair by size, else random."""
        ms = tuple(sorted(set(members)))
        if kind is None:
            kind = "singleton" if len(ms) == 1 else "pair" if len(ms) == 2 else "random"
        return cls(id=subset_id(ms), members=ms, kind=kind)

    def __len__(self) -> int:
        return len(self.members)


# Above this many size-k combinations we sample by rejection instead of enumerating them all.
_ENUMERATE_LIMIT = 200_000


def estimation_subsets(names: list[str], *, n_random: int, size: int, seed: int) -> list[Subset]:
    """The subsets the pipeline estimates: every singleton and pair, plus n_random seeded random subsets of `size`
    (size capped at the number of datasets, n_random at the number of such subsets; none when size <= 2, which
    would only repeat the singletons and pairs)."""
    size = min(size, len(names))
    n_random = min(n_random, math.comb(len(names), size)) if size > 2 else 0
    return make_subsets(names, n_random=n_random, size=size, seed=seed)


def make_subsets(
    names: list[str],
    *,
    n_random: int,
    size: int,
    seed: int,
    include_singletons: bool = True,
    include_pairs: bool = True,
) -> list[Subset]:
    """Singletons, then pairs (lexicographic over sorted names), then n_random distinct random subsets of `size`.

    The result depends only on the set of names and the arguments, not on the order of `names`.
    Random subsets never repeat each other nor a singleton/pair already in the list.
    """
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ValueError("names must be a list of non-empty strings")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate dataset names: {dup}")
    if not names:
        raise ValueError("names is empty")
    for arg, val in (("n_random", n_random), ("size", size), ("seed", seed)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise TypeError(f"{arg} must be an int, got {val!r}")
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}")
    n = len(names)
    if n_random > 0 and not 1 <= size <= n:
        raise ValueError(f"size must be in [1, {n}] (number of datasets), got {size}")

    names = sorted(names)
    out: list[Subset] = []
    if include_singletons:
        out += [Subset.of((a,), "singleton") for a in names]
    if include_pairs:
        out += [Subset.of(p, "pair") for p in combinations(names, 2)]
    if n_random == 0:
        return out

    taken = {s.id for s in out}
    total = math.comb(n, size)
    already = sum(1 for s in out if len(s) == size)  # size-k subsets that are already in the list
    if n_random > total - already:
        raise ValueError(
            f"asked for {n_random} random subsets of size {size} from {n} datasets, "
            f"but only {total - already} distinct ones are left"
        )
    rng = np.random.default_rng(seed)
    if total <= _ENUMERATE_LIMIT:
        # Small space: shuffle all combinations and take the first n_random not already present.
        pool = [c for c in combinations(range(n), size)]
        picks = []
        for j in rng.permutation(len(pool)):
            s = Subset.of((names[i] for i in pool[j]), "random")
            if s.id not in taken:
                taken.add(s.id)
                picks.append(s)
                if len(picks) == n_random:
                    break
    else:
        # Huge space: rejection sampling; duplicates are rare, so this ends quickly.
        picks = []
        while len(picks) < n_random:
            s = Subset.of((names[i] for i in rng.choice(n, size=size, replace=False)), "random")
            if s.id not in taken:
                taken.add(s.id)
                picks.append(s)
    return out + picks
