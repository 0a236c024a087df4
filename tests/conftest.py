"""Shared fixtures."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from grouplora.ml.model import load_base_model


@pytest.fixture(scope="module")
def one_thread():
    # A 64-wide model is dominated by thread hand-off on a shared 2-core box: one thread is faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama and its in-memory tokenizer (no download)."""
    return load_base_model("tiny")


def tick_sensor(sensor, instance, cursor, resources):
    """One evaluation of a sensor, applying its dynamic-partition requests to the instance as the daemon does."""
    import dagster as dg

    result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources))
    for req in result.dynamic_partitions_requests:
        if isinstance(req, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        else:
            for key in req.partition_keys:
                instance.delete_dynamic_partition(req.partitions_def_name, key)
    return result


def make_folder(folder: Path, news: bool = False) -> Path:
    """A folder of three tiny datasets in three formats (+ `news`, a fourth, when asked)."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": [f"the film was {w} {i}" for i in range(12) for w in ("good", "bad")],
                  "label": ["pos", "neg"] * 12}).to_csv(folder / "reviews.csv", index=False)
    rows = [{"text": f"is {i} even", "label": "yes" if i % 2 == 0 else "no"} for i in range(18)]
    (folder / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pd.DataFrame({"text": [f"is it {w} today {i}" for i in range(9) for w in ("true", "false")],
                  "label": ["true", "false"] * 9}).to_parquet(folder / "facts.parquet")
    (folder / "datasets.yaml").write_text(
        "defaults:\n  template: \"{text}\\nAnswer:\"\n"
        "datasets:\n  reviews:\n    task_type: sentiment\n    label_words: {pos: ' positive', neg: ' negative'}\n"
        "  parity:\n    task_type: yes_no_qa\n    label_words: {yes: ' yes', no: ' no'}\n")
    if news:
        pd.DataFrame({"text": [f"the match ended {i} to {j}" if j % 2 else f"the market fell {i} points"
                               for i in range(10) for j in (1, 2)],
                      "label": ["sport", "business"] * 10}).to_csv(folder / "news.csv", index=False)
    return folder


def _project(tmp_path, monkeypatch, news: bool):
    folder = make_folder(tmp_path / "datasets", news=news)
    monkeypatch.setenv("GROUPLORA_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("GROUPLORA_DATASETS", str(folder))
    monkeypatch.setenv("GROUPLORA_BASE_MODEL", "tiny")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "var" / "dagster_home"))
    # `defs` binds its resources to the environment at import: import it afresh for this test's folders, and
    # drop it afterwards so that a later test imports it for its own (tests pass in any order).
    sys.modules.pop("grouplora.orchestration.definitions", None)
    yield tmp_path
    sys.modules.pop("grouplora.orchestration.definitions", None)


@pytest.fixture()
def plain_project(tmp_path, monkeypatch):
    """make_folder's three datasets as the project's datasets, the tiny model, state under tmp_path/var."""
    yield from _project(tmp_path, monkeypatch, news=False)


@pytest.fixture()
def news_project(tmp_path, monkeypatch):
    """The same with `news` as a fourth dataset: three are left after one is removed (the partition needs three)."""
    yield from _project(tmp_path, monkeypatch, news=True)
