"""The pipeline's chain as stages the benchmark drivers share (suite.py, positive_control.py): each stage calls the
same ml/ functions and SQL models the assets call, so an experiment measures what the pipeline runs.

  affinity_stage   estimates of the pipeline's subsets (ml.subsets.estimation_subsets, ml.estimation
                   .estimate_subsets: the subset_estimates asset) → the SQL models subset_affinity and
                   pairwise_affinity in DuckDB (the sql assets) → T → symmetrized, number of groups, SDP partition
                   (ml.clustering.partition_datasets: the task_partition asset); with `resample`, on a bootstrap
                   draw of the random subsets (suite.py's stability stage)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from grouplora.ml.clustering import Partition, affinity_matrix_from, partition_datasets
from grouplora.ml.estimation import FeatureSet, estimate_subsets
from grouplora.ml.subsets import Subset, estimation_subsets

from estimation_fidelity import _jsonable

SQL = Path(__file__).resolve().parents[1] / "dbt_like_sql" / "models"



class Work:
    """The resumable state: stage JSONs, adapters, cached logits, timings."""

    def __init__(self, root: Path, budget_s: float | None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.budget_s = budget_s

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def stage(self, name: str, fn: Callable[[], dict]) -> dict:
        p = self.path(f"{name}.json")
        if p.exists():
            return json.loads(p.read_text())
        if self.budget_s is not None and time.time() - self.t0 > self.budget_s:
            raise TimeoutError(f"time budget spent before stage {name}: rerun to resume")
        t = time.time()
        print(f"== {name}", flush=True)
        out = fn()
        out["stage_seconds"] = time.time() - t
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=_jsonable))
        tmp.replace(p)
        print(f"== {name} done in {out['stage_seconds']:.1f} s", flush=True)
        return json.loads(p.read_text())  # as a resumed run reads it back


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The sizes and the training/feature recipe that suite.py and positive_control.py share."""
    p.add_argument("--max-train", dest="max_train_per_dataset", type=int, default=300)
    p.add_argument("--max-val", dest="max_val_per_dataset", type=int, default=100)
    p.add_argument("--max-test", dest="max_test_per_dataset", type=int, default=300)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--feature-batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--d", type=int, default=200)


def sql_models(estimates: pd.DataFrame, models: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """The pipeline's SQL models (dbt_like_sql/models/<name>.sql) over a subset_estimates table, in DuckDB."""
    con = duckdb.connect()
    try:
        con.register("subset_estimates", estimates)
        return {m: con.sql((SQL / f"{m}.sql").read_text()).df() for m in models}
    finally:
        con.close()


def bootstrap_subsets(subsets: list[Subset], seed: int) -> list[Subset]:
    """The singletons and pairs, and a draw with replacement of as many random subsets as there are: what
    subset_affinity averages over, resampled (a subset drawn k times counts k times in its averages)."""
    fixed = [x for x in subsets if x.kind != "random"]
    rand = [x for x in subsets if x.kind == "random"]
    idx = np.random.default_rng(seed).integers(0, len(rand), len(rand))
    return fixed + [rand[i] for i in idx]


def affinity_stage(feats: FeatureSet, *, lam: float, n_random: int, size: int, seed: int, max_m: int, m: int = 0,
                   resample: int | None = None) -> tuple[dict, Partition, pd.DataFrame]:
    """Estimation → affinity → partition. Returns (a JSON-able record, the Partition, the pairwise_affinity
    table). m > 0 fixes the number of groups (else chosen over 2..max_m); resample = a seed: the random subsets
    are a bootstrap draw of the pipeline's (bootstrap_subsets), for the partition's stability."""
    subsets = estimation_subsets(list(feats.names), n_random=n_random, size=size, seed=seed)
    if resample is not None:
        subsets = bootstrap_subsets(subsets, resample)
    t = time.perf_counter()
    est, fit = estimate_subsets(feats, subsets, lam=lam)
    est_s = time.perf_counter() - t
    tables = sql_models(est, ("subset_affinity", "pairwise_affinity"))
    T, names = affinity_matrix_from(tables["subset_affinity"].rename(columns={"affinity_neg_loss": "value"})
                                    [["target", "source", "value"]])
    part = partition_datasets(T, names, m=m, max_m=max_m, seed=seed)
    print("  groups: " + " | ".join(", ".join(g) for g in part.groups), flush=True)
    record = {"names": names, "T": T, "A": part.A, "labels": part.labels, "m": part.m, "groups": part.groups,
              "m_scores": None if part.m_scores is None else part.m_scores.to_dict(orient="records"),
              "n_subsets": len(subsets),
              "n_subsets_in_affinity": int(sum(x.kind == "random" for x in subsets)),  # what subset_affinity averages
              "estimate_seconds": est_s, "converged": bool(fit.converged.all()), "lam": lam}
    return record, part, tables["pairwise_affinity"]
