"""Shared fixtures. Tests get helpers as fixtures (`make_folder`, `tick_sensor`), never by importing conftest."""

import json
import subprocess
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


def _tick_sensor(sensor, instance, cursor, resources):
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


@pytest.fixture()
def tick_sensor():
    """tick_sensor(sensor, instance, cursor, resources): one evaluation, applying its partition requests."""
    return _tick_sensor


def write_datasets(folder: Path, news: bool = False) -> Path:
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


@pytest.fixture()
def make_folder():
    """make_folder(folder, news=False): write the tiny datasets into `folder` and return it."""
    return write_datasets


def _project(tmp_path, monkeypatch, news: bool) -> Path:
    # The resources read these when a run uses them (not when the Definitions load), so the one cached `defs`
    # of this process serves every test's project: nothing to reload, and the order of tests does not matter.
    folder = write_datasets(tmp_path / "datasets", news=news)
    monkeypatch.setenv("GROUPLORA_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("GROUPLORA_DATASETS", str(folder))
    monkeypatch.setenv("GROUPLORA_BASE_MODEL", "tiny")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "var" / "dagster_home"))
    return tmp_path


@pytest.fixture()
def plain_project(tmp_path, monkeypatch):
    """write_datasets's three datasets as the project's datasets, the tiny model, state under tmp_path/var."""
    return _project(tmp_path, monkeypatch, news=False)


@pytest.fixture()
def news_project(tmp_path, monkeypatch):
    """The same with `news` as a fourth dataset: three are left after one is removed (the partition needs three)."""
    return _project(tmp_path, monkeypatch, news=True)


def _concurrent_partition_runs(keys: list[str], *args: str) -> list[dict]:
    """One partition run per key, all at once, each in its own process (tests/pipeline_jobs.py KEY EXECUTOR ...);
    every process must succeed; returns their result records."""
    script = Path(__file__).parent / "pipeline_jobs.py"
    procs = [subprocess.Popen([sys.executable, str(script), key, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for key in keys]
    outs = [p.communicate(timeout=540) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(r["success"] for r in results), [err[-4000:] for _, err in outs]
    return results


@pytest.fixture()
def concurrent_partition_runs():
    return _concurrent_partition_runs
