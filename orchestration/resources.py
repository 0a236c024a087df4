"""Dagster resources: the dataset source folder, the DuckDB warehouse, the base model and MLflow tracking.

Each is plain configuration plus methods; nothing is held between steps, so every step can run in its own
process (the multiprocess executor here, a cluster executor later). Locations left empty are read from the
environment (orchestration/settings.py) when used, not when the Definitions load: a process that loaded the
Definitions once can run projects with other GROUPLORA_* settings (tests do).
"""


import os
import random
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal

import dagster as dg
import duckdb
import pandas as pd
import pydantic

from grouplora.ml.data_format import (ConfigError, DatasetError, SuiteConfig, discover, load_suite_config, scan,
                                        validate_name)
from grouplora.ml.hashing import sha256_file
from grouplora.orchestration import settings
from grouplora.orchestration.devices import check_device, resolve_device
from grouplora.orchestration.settings import GradientSettings, TrainingSettings
from grouplora.orchestration.store import ArtifactStore
from grouplora.orchestration.globs import literal_folder_glob


class DatasetSourceResource(dg.ConfigurableResource):
    """The folder of dataset files (CSV/JSONL/Parquet) and its YAML of per-dataset settings."""

    folder: str = ""  # "" = $GROUPLORA_DATASETS or data/demo
    config_file: str = "datasets.yaml"
    seed: int = 0

    def root(self) -> Path:
        return Path(self.folder) if self.folder else settings.datasets_folder()

    def files(self) -> dict[str, Path]:
        """Dataset name -> file for every usable file; unusable ones (see `scan`) are left out, so that one bad file
        never stops the others."""
        return self.scan()[0]

    def scan(self) -> tuple[dict[str, Path], list[DatasetError]]:
        """The usable files and one DatasetError per unusable one (ml.data_format.scan); a missing folder is empty."""
        folder = self.root()
        return scan(folder) if folder.exists() else ({}, [])

    def config(self) -> SuiteConfig:
        return load_suite_config(self.root() / self.config_file)

    def version(self, name: str) -> str:
        """Content version of one dataset: its file's bytes and its settings (what the sensor compares)."""
        path = self.files()[validate_name(name)]
        return f"{sha256_file(path)[:16]}-{self.config().for_dataset(name).fingerprint()}-s{self.seed}"


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB file. Partitioned steps only write Parquet; the warehouse holds views over those files
    and the SQL models' tables, so parallel partitions never need one writer at the same time. The short
    writes that remain (creating a view, one SQL model) retry while another process holds the file lock."""

    path: str = ""  # "" = GROUPLORA_HOME/warehouse.duckdb
    lock_timeout_s: float = 120.0

    def file(self) -> Path:
        return Path(self.path) if self.path else settings.home() / "warehouse.duckdb"

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        path = self.file()
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                con = duckdb.connect(str(path), read_only=read_only and path.exists())
                break
            except duckdb.IOException as e:
                if "lock" not in str(e).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.2 + random.random() * 0.5)
        try:
            yield con
        finally:
            con.close()

    def register_parquet(self, view: str, glob: str, array_columns: dict[str, int] | None = None) -> None:
        """(Re)create a view over every Parquet file matching `glob` (new partitions appear automatically); only
        its last component is a pattern, the folder is literal (orchestration.globs).
        array_columns: {column: k} exposes those list columns as DuckDB fixed-size FLOAT[k] arrays."""
        validate_name(view, "view name")
        literal = "'" + literal_folder_glob(glob).replace("'", "''") + "'"  # a view's body takes no parameters
        casts = ", ".join(f"{validate_name(c, 'column name')}::FLOAT[{int(k)}] AS {c}" for c, k in (array_columns or {}).items())
        select = f"* REPLACE ({casts})" if casts else "*"
        with self.connect() as con:
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {select} FROM read_parquet({literal}, union_by_name=true)")

    def query(self, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
        with self.connect(read_only=True) as con:
            # Through Arrow: FLOAT[k] columns become arrays of floats (fetchnumpy() cannot do that).
            return con.sql(sql, params=params or None).to_arrow_table().to_pandas()

    def tables(self) -> set[str]:
        if not self.file().exists():
            return set()
        with self.connect(read_only=True) as con:
            return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


class BaseModelResource(dg.ConfigurableResource):
    """The base language model: SmolLM2-135M-Instruct from its registry wheel, a local HF folder, or 'tiny'."""

    name: str = ""  # "" = $GROUPLORA_BASE_MODEL or smollm2-135m-instruct
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # auto: the GPU this step was given (Ray, or the host's first), else the CPU; or cpu, cuda, cuda:N
    device: str = "auto"
    load_in_4bit: bool = False
    max_length: int = 256
    # Scoring batches: prompts of similar length, at most batch_size of them (0 = no cap) and max_tokens padded
    # tokens (0 = the device's budget, ml.scoring.default_max_tokens). Only float error depends on them.
    batch_size: int = 16
    max_tokens: int = 0

    @pydantic.field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return check_device(value)

    @pydantic.field_validator("batch_size", "max_tokens")
    @classmethod
    def _check_batching(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be >= 0 (0 = not set), got {value}")
        return value

    def batching(self) -> dict[str, int | None]:
        """{batch_size, max_tokens} of the scoring batches on this step's device (ml.scoring.batching)."""
        from grouplora.ml.scoring import batching

        return batching(self.torch_device(), self.batch_size, self.max_tokens)

    def model_name(self) -> str:
        return self.name or settings.base_model_name()

    def torch_device(self) -> str:
        """The device this step's model goes on (resolved here: under Ray, the GPU Ray assigned this step)."""
        return resolve_device(self.device)

    def numerics(self) -> str:
        """What of the model's placement changes a trained adapter: the dtype and the device type (cpu or cuda;
        which GPU, and how many, do not: every step trains on one device). A step that loads no model may ask
        (task_partition keys adapters by it): 'auto' then needs this host's view to be the GPU steps' (one host;
        the CLI makes it 'cuda' under Ray)."""
        return f"{self.dtype}-{self.torch_device().partition(':')[0]}"

    def load(self, load_in_4bit: bool | None = None) -> tuple[Any, Any]:
        """(model, tokenizer), loaded once per process; load_in_4bit overrides the setting (QLoRA training)."""
        four_bit = self.load_in_4bit if load_in_4bit is None else load_in_4bit
        return _load_model(self.model_name(), self.dtype, self.torch_device(), four_bit)

    def tokenizer(self) -> Any:
        """The tokenizer alone (a CPU step needs no weights)."""
        return _load_tokenizer(self.model_name())

    @contextmanager
    def lora(self, gradient_settings: GradientSettings, init_adapter: str | None = None) -> Iterator[tuple[Any, Any]]:
        """(θ0, tokenizer) for the block: base + fresh LoRA (B = 0) or a saved adapter (`init_adapter` when given,
        else gradient_settings.init_adapter, e.g. the meta-initialization), put on the process-wide cached base
        itself (ml.lora.lora_on: no deep copy) and taken off again afterwards, so the next step in this process
        finds the base as it was loaded."""
        from grouplora.ml.lora import lora_on

        model, tokenizer = self.load()
        init = init_adapter or gradient_settings.init_adapter
        s = gradient_settings
        lora = {} if init else dict(r=s.lora_r, alpha=s.lora_alpha, target_modules=s.modules(), seed=s.seed)
        with lora_on(model, init or None, **lora) as pm:
            yield pm, tokenizer

    def first_token(self, word: str) -> int:
        from grouplora.ml.model import label_token_ids

        return label_token_ids(self.tokenizer(), [word])[0]


@lru_cache(maxsize=2)
def _load_model(name: str, dtype: str, device: str, load_in_4bit: bool) -> tuple[Any, Any]:
    # One load per process: a step that needs the model pays for it once.
    import torch

    from grouplora.ml.model import load_base_model

    return load_base_model(name, dtype=getattr(torch, dtype), device=device, load_in_4bit=load_in_4bit)


@lru_cache(maxsize=2)
def _load_tokenizer(name: str) -> Any:
    from grouplora.ml.model import load_tokenizer

    return load_tokenizer(name)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking (a sqlite store under GROUPLORA_HOME; `grouplora ui` serves it on 127.0.0.1)."""

    tracking_uri: str = ""  # "" = sqlite:///GROUPLORA_HOME/mlflow/mlflow.db
    experiment: str = "grouplora"

    def uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{settings.home() / 'mlflow' / 'mlflow.db'}"

    def client_setup(self) -> Any:
        """mlflow, pointed at this store and experiment (created on first use, artifacts next to the db)."""
        import mlflow

        from grouplora.orchestration.registry import experiment_id, use_tracking

        mlflow.set_experiment(experiment_id=experiment_id(use_tracking(self.uri()), self.uri(), self.experiment))
        return mlflow

    def train_logged(self, context: dg.AssetExecutionContext, training_settings: TrainingSettings, base_model: str,
                     model_and_tokenizer: tuple[Any, Any], examples: list, out_dir: Path, *, run_name: str,
                     tags: dict[str, str], members: list[str], **train_kwargs: Any) -> tuple[Any, str]:
        """ml.training.train_adapter inside an MLflow run (params, per-step metrics, final metrics, the peft
        files as artifacts). Returns (TrainResult, MLflow run id). Every asset that trains an adapter uses it."""
        from grouplora.ml.training import train_adapter

        config = training_settings.config()
        mlflow = self.client_setup()
        with mlflow.start_run(run_name=run_name) as run:
            mlflow.set_tags({**tags, "grouplora.members": ",".join(members), "dagster.run_id": context.run.run_id})
            mlflow.log_params({**vars(config), "n_examples": len(examples), "base_model": base_model})

            def on_step(step: int, metrics: dict) -> None:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                                   step=step)
                if "epoch_loss" in metrics:
                    context.log.info(f"{run_name}: epoch {metrics.get('epoch')} loss {metrics['epoch_loss']:.4f}")

            result = train_adapter(model_and_tokenizer, examples, config, out_dir, on_step=on_step, **train_kwargs)
            mlflow.log_metrics({"final_loss": result.final_loss, "train_flops": float(result.flops),
                                "peak_memory_bytes": float(result.peak_memory_bytes), "seconds": result.seconds})
            for path in sorted(Path(out_dir).glob("adapter_*")):  # the peft files, not the epoch checkpoints
                mlflow.log_artifact(str(path), artifact_path="adapter")
        return result, run.info.run_id


# A project settings file holds the settings models' sections and the base model's (orchestration/settings.py).
SETTINGS_SECTIONS = {**settings.SETTINGS_SECTIONS, "model": ("base_model", BaseModelResource)}


def project_settings() -> dict[str, dg.ConfigurableResource]:
    """{resource key: resource} of every settings section: its defaults, then what the file $GROUPLORA_SETTINGS
    sets, then $GROUPLORA_DEVICE / $GROUPLORA_DTYPE over the model section (`--device` / `--dtype`). Read and
    checked when called; a ConfigError names the file (or variable) and the key."""
    path = settings.settings_file()
    values = settings.read_settings_file(path, SETTINGS_SECTIONS) if path else {}
    model = values.setdefault("base_model", {})
    for env, field in ((settings.DEVICE_ENV, "device"), (settings.DTYPE_ENV, "dtype")):
        if os.environ.get(env):
            model[field] = os.environ[env]
    where = path or f"${settings.DEVICE_ENV} / ${settings.DTYPE_ENV}"
    return {key: settings.checked(cls, values.get(key, {}), f"{section}.", lambda problem: ConfigError(where, problem))
            for section, (key, cls) in SETTINGS_SECTIONS.items()}


def settings_run_config() -> dict[str, Any]:
    """The `resources` run config that sets every settings resource to project_settings(), every field: a run
    carries its settings itself (shown with the run in the UI), whatever Definitions its process cached."""
    return {key: {"config": {f: getattr(r, f) for f in type(r).model_fields}}
            for key, r in project_settings().items()}


def make_resources() -> dict[str, dg.ConfigurableResource]:
    """Every resource under its key. Locations resolve from the environment when used, so the same objects
    serve whatever GROUPLORA_HOME / GROUPLORA_DATASETS / GROUPLORA_BASE_MODEL a run sees. The settings are the
    project's (project_settings: the UI's launchpad shows them) when the Definitions load."""
    return {"sources": DatasetSourceResource(), "store": ArtifactStore(), "warehouse": WarehouseResource(),
            "mlflow_tracking": MlflowResource(), **project_settings()}
