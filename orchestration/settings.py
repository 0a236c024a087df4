"""Where project state lives. Everything a step needs is under GROUPLORA_HOME (storage, DuckDB, MLflow,
DAGSTER_HOME), so any process on any worker that sees that folder can run any step."""


import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("GROUPLORA_HOME", Path.cwd() / "var")).resolve()


def datasets_folder() -> Path:
    """The folder of dataset files the pipeline watches (the demo pack by default)."""
    return Path(os.environ.get("GROUPLORA_DATASETS", Path.cwd() / "data" / "demo")).resolve()


def base_model_name() -> str:
    return os.environ.get("GROUPLORA_BASE_MODEL", "smollm2-135m-instruct")
