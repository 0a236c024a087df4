"""Dagster resources: the dataset source folder, the storage root, the DuckDB warehouse and the base model.

Each is plain configuration plus methods; nothing is held between steps, so every step can run in its own
process (the multiprocess executor here, a cluster executor later).
"""


import hashlib
import random
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
import duckdb
import pandas as pd
import pydantic

from grouplora.ml.data_format import SuiteConfig, discover, file_hash, load_suite_config, validate_name
from grouplora.orchestration.globs import literal_folder_glob


class DatasetSourceResource(dg.ConfigurableResource):
    """The folder of dataset files (CSV/JSONL/Parquet) and its YAML of per-dataset settings."""

    folder: str
    config_file: str = "datasets.yaml"
    seed: int = 0

    def files(self) -> dict[str, Path]:
        folder = Path(self.folder)
        return discover(folder) if folder.exists() else {}

    def config(self) -> SuiteConfig:
        return load_suite_config(Path(self.folder) / self.config_file)

    def version(self, name: str) -> str:
        """Content version of one dataset: its file's bytes and its settings (what the sensor compares)."""
        path = self.files()[validate_name(name)]
        return f"{file_hash(path)[:16]}-{self.config().for_dataset(name).fingerprint()}-s{self.seed}"


class StorageResource(dg.ConfigurableResource):
    """The storage root: one folder per artifact kind, one file per partition."""

    root: str

    def path(self, kind: str, name: str, suffix: str = ".parquet") -> Path:
        validate_name(kind, "artifact kind")
        validate_name(name)
        return Path(self.root) / kind / f"{name}{suffix}"

    def folder(self, kind: str) -> Path:
        return Path(self.root) / validate_name(kind, "artifact kind")

    def glob(self, kind: str, suffix: str = ".parquet") -> str:
        return str(self.folder(kind) / f"*{suffix}")


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB file. Partitioned steps only write Parquet; the warehouse holds views over those files
    and the SQL models' tables, so parallel partitions never need one writer at the same time. The short
    writes that remain (creating a view, one SQL model) retry while another process holds the file lock."""

    path: str
    lock_timeout_s: float = 120.0

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                con = duckdb.connect(self.path, read_only=read_only and Path(self.path).exists())
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
        if not Path(self.path).exists():
            return set()
        with self.connect(read_only=True) as con:
            return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


class BaseModelResource(dg.ConfigurableResource):
    """The base language model: SmolLM2-135M-Instruct from its registry wheel, a local HF folder, or 'tiny'."""

    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "cpu"
    load_in_4bit: bool = False
    max_length: int = 256
    batch_size: int = 16

    def load(self, load_in_4bit: bool | None = None) -> tuple[Any, Any]:
        """(model, tokenizer), loaded once per process; load_in_4bit overrides the setting (QLoRA training)."""
        four_bit = self.load_in_4bit if load_in_4bit is None else load_in_4bit
        return _load_model(self.name, self.dtype, self.device, four_bit)

    def first_token(self, word: str) -> int:
        from grouplora.ml.model import label_token_ids

        return label_token_ids(self.load()[1], [word])[0]


@lru_cache(maxsize=2)
def _load_model(name: str, dtype: str, device: str, load_in_4bit: bool) -> tuple[Any, Any]:
    # One load per process: a step that needs the model pays for it once.
    import torch

    from grouplora.ml.model import load_base_model

    return load_base_model(name, dtype=getattr(torch, dtype), device=device, load_in_4bit=load_in_4bit)


class GradientSettings(dg.ConfigurableResource):
    """How gradient features are taken. One setting for the whole suite: every partition's features must share
    the projection (same d, seed, LoRA shape) for the estimator to combine them."""

    d: int = 200
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: str = "q_proj,v_proj"
    batch_size: int = 8
    init_adapter: str = ""  # a meta-initialization adapter folder; empty = fresh LoRA (B = 0)
    approx_max_error: float = 0.05  # the asset check fails when the mean relative error at 1% scale exceeds this

    def modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.target_modules.split(",") if m.strip())

    def fingerprint(self) -> str:
        return f"d{self.d}-s{self.seed}-r{self.lora_r}-a{self.lora_alpha}-{'+'.join(self.modules())}" + \
            (f"-init:{Path(self.init_adapter).name}" if self.init_adapter else "")


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking (a sqlite store under GROUPLORA_HOME; `grouplora ui` serves it on 127.0.0.1)."""

    tracking_uri: str
    experiment: str = "grouplora"

    def client_setup(self) -> Any:
        """mlflow, pointed at this store and experiment (created on first use, artifacts next to the db)."""
        import mlflow

        from grouplora.orchestration.registry import experiment_id, use_tracking

        mlflow.set_experiment(experiment_id=experiment_id(use_tracking(self.tracking_uri), self.tracking_uri,
                                                          self.experiment))
        return mlflow


class EstimationSettings(dg.ConfigurableResource):
    """Which subsets to estimate and how: all singletons and pairs, plus n_random seeded subsets of `size`."""

    n_random: int = 200
    size: int = 3
    seed: int = 0
    lam: float = 1e-3
    verify_subsets: int = 3  # subsets re-scored in 'forward' mode (the real model at θ0 + Pw) for comparison


class PartitionSettings(dg.ConfigurableResource):
    """How datasets are grouped: m groups (0 = choose m automatically), SDP or spectral clustering."""

    m: int = 0
    max_m: int = 4
    method: str = "sdp"  # sdp | spectral
    normalize: str = "row_zscore"  # affinity rows live on each dataset's own scale; see ml.clustering.symmetrize
    seed: int = 0


class TrainingSettings(dg.ConfigurableResource):
    """One setting for every adapter (group, baseline, boosting) so their costs and results compare."""

    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: str = "q_proj,v_proj"
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 8
    max_length: int = 160
    qlora: bool = False
    seed: int = 0

    def config(self) -> Any:
        from grouplora.ml.training import TrainConfig

        return TrainConfig(r=self.lora_r, alpha=self.lora_alpha, lr=self.lr, epochs=self.epochs,
                           batch_size=self.batch_size, max_length=self.max_length, qlora=self.qlora, seed=self.seed,
                           target_modules=tuple(m.strip() for m in self.target_modules.split(",") if m.strip()),
                           warmup_ratio=0.1)

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(self.config()).encode()).hexdigest()[:12]


class SelectionSettings(dg.ConfigurableResource):
    """Choosing auxiliary datasets for a target (target_selection): how many, from how many random subsets."""

    top_k: int = 3  # at most this many auxiliaries per method (random ensemble, forward selection, cosines)
    n_subsets: int = 200  # random auxiliary sets for the random-ensemble score
    size: int = 0  # auxiliaries per random set; 0 = a third of them
    lam: float = 1e-3  # the estimator's L2 penalty
    min_gain: float = 0.0  # forward selection stops when no addition lowers the estimated loss by more
    seed: int = 0
    hidden_max_examples: int = 64  # train prompts per dataset for the mean hidden state (hidden_cosine)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "SelectionSettings":
        problems = [f"{k} must be >= {low}, got {getattr(self, k)}" for k, low in
                    (("top_k", 1), ("n_subsets", 1), ("size", 0), ("seed", 0), ("hidden_max_examples", 1))
                    if getattr(self, k) < low]
        if not 0 < self.lam < float("inf"):  # written so that NaN fails too
            problems.append(f"lam must be finite and > 0, got {self.lam}")
        if not 0 <= self.min_gain < float("inf"):
            problems.append(f"min_gain must be finite and >= 0, got {self.min_gain}")
        if problems:
            raise ValueError("SelectionSettings: " + "; ".join(problems))
        return self


class EnsembleSettings(dg.ConfigurableResource):
    """Boosting and the registry: boost a group when its train error stays above `boost_threshold`."""

    boost_threshold: float = 0.2  # mean train cross-entropy of a group's adapter above which it gets boosted
    boost_mode: str = "ridge"  # ridge: no training (features + projection); trained: a loss-weighted adapter
    boost_lam: float = 1.0
    boost_rounds: int = 1  # 0 disables boosting; one round per group is what is implemented
    registered_name: str = "grouplora-ensemble"
