"""benchmarks/ensemble_stage.py's own arithmetic: py-spy's collapsed stacks to seconds per function, and the
old/new comparison that must catch any difference in the results table or the served weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ensemble_stage import compare, function_seconds  # noqa: E402


def test_function_seconds_counts_inclusive_samples(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("main (a.py:1);score_datasets (e.py:9);mixed_logprobs (i.py:3) 40\n"
                   "main (a.py:1);boost_group (b.py:2);logprobs_by_dataset (b.py:7);predict_logprobs (s.py:1) 20\n"
                   "main (a.py:1) 10\n")
    s = function_seconds(raw, rate=20)
    assert s["sampled_s"] == 3.5 and s["score_datasets"] == 2.0 and s["mixed_logprobs"] == 2.0
    assert s["boost_group"] == s["predict_logprobs"] == 1.0 and "merged_logprobs" not in s


def home(root: Path, acc: float, alpha: float) -> Path:
    (root / "storage" / "ensemble" / "current").mkdir(parents=True)
    pd.DataFrame({"dataset": ["a", "b"], "ensemble": [0.5, acc], "n_rounds": [0, 1]}).to_parquet(
        root / "storage" / "ensemble" / "results.parquet")
    (root / "storage" / "ensemble" / "current" / "ensemble.json").write_text(
        json.dumps({"weights": {"a": {"g": 1.0}, "b": {"g": 0.5, "r": alpha}}}))
    return root


def test_compare_finds_any_difference(tmp_path):
    same = compare(home(tmp_path / "o", 0.75, 2.0), home(tmp_path / "n", 0.75, 2.0 + 1e-4))
    assert same["tables_equal"] and same["same_weight_keys"] and abs(same["weights_max_abs_diff"] - 1e-4) < 1e-12
    other = compare(home(tmp_path / "o2", 0.75, 2.0), home(tmp_path / "n2", 0.7, 2.0))
    assert not other["tables_equal"] and other["unequal_columns"] == ["ensemble"]
    assert abs(other["max_abs_diff"]["ensemble"] - 0.05) < 1e-12
