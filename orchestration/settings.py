"""Settings: where project state lives (read from the environment when used, never at import) and one typed
settings model per concern, each defined once and used by the assets, the CLI and the benchmarks.

Everything a step needs is under GROUPLORA_HOME (storage, DuckDB, MLflow, DAGSTER_HOME), so any process on any
worker that sees that folder can run any step. Choices are `Literal`s and bounds are validated: a typo fails when
the settings are built, instead of silently running another method. A project settings file (YAML,
$GROUPLORA_SETTINGS or `--settings`) sets any of them, one section per concern (read_settings_file;
resources.project_settings adds the base model's section and --device / --dtype).
"""

import hashlib
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Literal

import dagster as dg
import pydantic

from grouplora.ml.data_format import ConfigError, read_yaml
from grouplora.ml.boosting import BoostSettings
from grouplora.ml.training import TrainConfig

# ------------------------------------------------------------------------------------------ environment


def home() -> Path:
    return Path(os.environ.get("GROUPLORA_HOME", Path.cwd() / "var")).resolve()


def datasets_folder() -> Path:
    """The folder of dataset files the pipeline watches (the demo pack by default)."""
    return Path(os.environ.get("GROUPLORA_DATASETS", Path.cwd() / "data" / "demo")).resolve()


def base_model_name() -> str:
    return os.environ.get("GROUPLORA_BASE_MODEL", "smollm2-135m-instruct")


SETTINGS_ENV = "GROUPLORA_SETTINGS"  # the project settings file (YAML); `--settings` sets it
DEVICE_ENV = "GROUPLORA_DEVICE"  # the base model's device over the file's; `--device` sets it
DTYPE_ENV = "GROUPLORA_DTYPE"  # the base model's dtype over the file's; `--dtype` sets it


def settings_file() -> Path | None:
    value = os.environ.get(SETTINGS_ENV)
    return Path(value).resolve() if value else None


def debug() -> bool:
    """GROUPLORA_DEBUG=1 (`grouplora --debug`): print whole errors with their stack traces."""
    return os.environ.get("GROUPLORA_DEBUG", "") not in ("", "0")


def lock_timeout() -> float:
    """Seconds a command waits for another one on the same home (GROUPLORA_LOCK_TIMEOUT, default one day)."""
    value = os.environ.get("GROUPLORA_LOCK_TIMEOUT", "86400")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"GROUPLORA_LOCK_TIMEOUT must be a number of seconds, got {value!r}") from None
    if not seconds >= 0:
        raise ValueError(f"GROUPLORA_LOCK_TIMEOUT must be >= 0, got {value!r}")
    return seconds


# ------------------------------------------------------------------------------------------ typed settings


def _check_bounds(model: Any, lower: dict[str, float], positive: tuple[str, ...] = ()) -> None:
    """Raise one ValueError naming every field below its lower bound (or not finite and > 0)."""
    problems = [f"{k} must be >= {low}, got {getattr(model, k)}" for k, low in lower.items()
                if not getattr(model, k) >= low]  # `not >=` so that NaN fails too
    problems += [f"{k} must be finite and > 0, got {getattr(model, k)}" for k in positive
                 if not 0 < getattr(model, k) < float("inf")]
    if problems:
        raise ValueError(f"{type(model).__name__}: " + "; ".join(problems))


class GradientSettings(dg.ConfigurableResource):
    """How gradient features are taken. One setting for the whole suite: every partition's features must share
    the projection (same d, seed, LoRA shape) for the estimator to combine them."""

    d: int = 200
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: str = "q_proj,v_proj"
    # Batches of the features pass: similar lengths, at most max_tokens padded tokens (0 = the device's budget,
    # ml.scoring.default_max_tokens) and batch_size examples (0 = no cap). Not in the fingerprint: the features
    # do not depend on them (up to float error).
    batch_size: int = 0
    max_tokens: int = 0
    init_adapter: str = ""  # a meta-initialization adapter folder; empty = fresh LoRA (B = 0)
    approx_max_error: float = 0.05  # the asset check fails when the mean relative error at 1% scale exceeds this

    @pydantic.model_validator(mode="after")
    def _check(self) -> "GradientSettings":
        _check_bounds(self, {"d": 1, "seed": 0, "lora_r": 1, "lora_alpha": 1, "batch_size": 0, "max_tokens": 0},
                      ("approx_max_error",))
        if not self.modules():
            raise ValueError("GradientSettings: target_modules names no module")
        return self

    def modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.target_modules.split(",") if m.strip())

    def fingerprint(self) -> str:
        return f"d{self.d}-s{self.seed}-r{self.lora_r}-a{self.lora_alpha}-{'+'.join(self.modules())}" + \
            (f"-init:{Path(self.init_adapter).name}" if self.init_adapter else "")


class EstimationSettings(dg.ConfigurableResource):
    """Which subsets to estimate and how: all singletons and pairs, plus n_random seeded subsets of `size`; and how
    the estimator's λ is chosen (lam_calibration): against real fine-tunes of `calibration_subsets` random subsets
    of `calibration_size` datasets from the features' θ0, or pinned by `lam`."""

    n_random: int = 200
    size: int = 3
    seed: int = 0
    lam: float | None = None  # None: calibrated in the pipeline (lam_calibration); a number pins λ (no fine-tunes)
    calibration_subsets: int = 2  # subsets really fine-tuned to choose λ
    calibration_size: int = 2  # datasets per calibration subset
    # cap on each calibration fine-tune's optimizer steps (its schedule is fitted to the cap): 12 = one epoch of a
    # demo-sized pair (2 × 48 examples, batch 8), keeping the CPU demo fast; 0 = the adapters' full recipe
    calibration_max_steps: int = 12
    verify_subsets: int = 3  # subsets re-scored in 'forward' mode (the real model at θ0 + Pw) for comparison

    @pydantic.model_validator(mode="after")
    def _check(self) -> "EstimationSettings":
        _check_bounds(self, {"n_random": 0, "size": 1, "seed": 0, "verify_subsets": 0, "calibration_subsets": 0,
                             "calibration_size": 1, "calibration_max_steps": 0},
                      ("lam",) if self.lam is not None else ())
        if self.lam is None and self.calibration_subsets < 1:
            raise ValueError("EstimationSettings: calibration_subsets must be >= 1 unless lam pins λ")
        return self


class PartitionSettings(dg.ConfigurableResource):
    """How datasets are grouped: m groups (0 = choose m automatically), SDP or spectral clustering."""

    m: int = 0
    max_m: int = 4
    method: Literal["sdp", "spectral"] = "sdp"
    # affinity rows live on each dataset's own scale; see ml.clustering.symmetrize
    normalize: Literal["none", "row_center", "row_zscore"] = "row_zscore"
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _check(self) -> "PartitionSettings":
        _check_bounds(self, {"m": 0, "max_m": 2, "seed": 0})
        return self


_TRAIN = {f.name: f.default for f in fields(TrainConfig)}  # the one source of training defaults: ml/training.py


class TrainingSettings(dg.ConfigurableResource):
    """One setting for every adapter (group, baseline, boosting, meta-init) so their costs and results compare.
    Defaults come from ml/training.py:TrainConfig (defined there once)."""

    lora_r: int = _TRAIN["r"]
    lora_alpha: int = _TRAIN["alpha"]
    target_modules: str = ",".join(_TRAIN["target_modules"])
    lr: float = _TRAIN["lr"]
    epochs: int = _TRAIN["epochs"]
    batch_size: int = _TRAIN["batch_size"]
    max_length: int = _TRAIN["max_length"]
    warmup_ratio: float = _TRAIN["warmup_ratio"]
    qlora: bool = _TRAIN["qlora"]
    seed: int = _TRAIN["seed"]

    @pydantic.model_validator(mode="after")
    def _check(self) -> "TrainingSettings":
        _check_bounds(self, {"lora_r": 1, "lora_alpha": 1, "epochs": 1, "batch_size": 1, "max_length": 8,
                             "seed": 0, "warmup_ratio": 0.0}, ("lr",))
        if not self.warmup_ratio < 1:
            raise ValueError(f"TrainingSettings: warmup_ratio must be < 1, got {self.warmup_ratio}")
        return self

    def config(self) -> TrainConfig:
        return TrainConfig(r=self.lora_r, alpha=self.lora_alpha, lr=self.lr, epochs=self.epochs,
                           batch_size=self.batch_size, max_length=self.max_length, qlora=self.qlora, seed=self.seed,
                           target_modules=tuple(m.strip() for m in self.target_modules.split(",") if m.strip()),
                           warmup_ratio=self.warmup_ratio)

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(self.config()).encode()).hexdigest()[:12]


class SelectionSettings(dg.ConfigurableResource):
    """Choosing auxiliary datasets for a target (target_selection): how many, from how many random subsets."""

    top_k: int = 3  # at most this many auxiliaries per method (random ensemble, forward selection, cosines)
    n_subsets: int = 200  # random auxiliary sets for the random-ensemble score
    size: int = 0  # auxiliaries per random set; 0 = a third of them
    lam: float | None = None  # the estimator's λ; None: calibrated at the meta-initialization (meta_lam_calibration)
    min_gain: float = 0.0  # forward selection stops when no addition lowers the estimated loss by more
    seed: int = 0
    hidden_max_examples: int = 64  # train prompts per dataset for the mean hidden state (hidden_cosine)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "SelectionSettings":
        _check_bounds(self, {"top_k": 1, "n_subsets": 1, "size": 0, "seed": 0, "hidden_max_examples": 1},
                      ("lam",) if self.lam is not None else ())
        if not 0 <= self.min_gain < float("inf"):
            raise ValueError(f"SelectionSettings: min_gain must be finite and >= 0, got {self.min_gain}")
        return self


class EnsembleSettings(dg.ConfigurableResource):
    """The ACL ensemble (assets/ensemble.py): boosting rounds per group (ml.boosting.BoostSettings) while the
    group's selection-fold loss stays above `boost_threshold`, weights per dataset on the weights fold (ml.folds),
    and what the registry serves."""

    boost_mode: Literal["ridge", "trained"] = "ridge"  # ridge: no training (features + projection); trained: LoRA
    boost_rounds: int = 3  # R: at most this many rounds per group; 0 disables boosting
    boost_eta: float = 0.5  # step size η
    boost_threshold: float = 0.2  # boost while the group's selection-fold mean cross-entropy stays above this
    boost_min_gain: float = 1e-3  # keep a round only if that loss drops by more than this
    ridge_lam: float = 0.1  # ridge rounds: λ relative to the mean eigenvalue of GᵀG
    boost_epochs: int = 1  # trained rounds: epochs of each round's adapter
    boost_max_steps: int = 0  # trained rounds: cap on each round's optimizer steps; 0 = none
    include_all: bool = False  # serve `ensemble_with_all` (the all-datasets adapter as a candidate) instead
    registered_name: str = "grouplora-ensemble"

    @pydantic.model_validator(mode="after")
    def _check(self) -> "EnsembleSettings":
        _check_bounds(self, {"boost_threshold": 0.0, "boost_rounds": 0, "boost_min_gain": 0.0, "boost_epochs": 1,
                             "boost_max_steps": 0}, ("boost_eta", "ridge_lam"))
        return self

    def boost(self) -> BoostSettings:
        return BoostSettings(mode=self.boost_mode, rounds=self.boost_rounds, eta=self.boost_eta,
                             threshold=self.boost_threshold, min_gain=self.boost_min_gain, ridge_lam=self.ridge_lam,
                             train_epochs=self.boost_epochs, train_max_steps=self.boost_max_steps or None)


def settings_resources() -> dict[str, dg.ConfigurableResource]:
    """The default settings of every concern, under their resource keys."""
    return {"gradient_settings": GradientSettings(), "estimation_settings": EstimationSettings(),
            "partition_settings": PartitionSettings(), "training_settings": TrainingSettings(),
            "ensemble_settings": EnsembleSettings(), "selection_settings": SelectionSettings()}


# The sections of a project settings file: section -> (resource key, typed settings model).
SETTINGS_SECTIONS: dict[str, tuple[str, type[dg.ConfigurableResource]]] = {
    "gradient": ("gradient_settings", GradientSettings), "estimation": ("estimation_settings", EstimationSettings),
    "partition": ("partition_settings", PartitionSettings), "training": ("training_settings", TrainingSettings),
    "ensemble": ("ensemble_settings", EnsembleSettings), "selection": ("selection_settings", SelectionSettings)}


def read_settings_file(path: Path, sections: dict[str, tuple[str, type[dg.ConfigurableResource]]],
                       ) -> dict[str, dict[str, Any]]:
    """{resource key: {setting: value}} of a project settings file (YAML, safe-loaded): one mapping per section,
    each checked by its settings model; only the settings the file sets, as the model parsed them. Anything else
    (unknown section or setting, wrong type, out of bounds) is a ConfigError naming the file and the key."""
    raw = read_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping of sections ({', '.join(sections)}), got a {type(raw).__name__}")
    unknown = sorted(map(str, set(raw) - set(sections)))
    if unknown:
        raise ConfigError(path, f"unknown section(s) {unknown}; allowed: {sorted(sections)}")
    out = {}
    for section, block in raw.items():
        key, model = sections[section]
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ConfigError(path, f"{section} must be a mapping of setting to value, got {block!r}")
        unknown = sorted(map(str, set(block) - set(model.model_fields)))
        if unknown:
            raise ConfigError(path, f"{section}: unknown setting(s) {unknown}; allowed: {sorted(model.model_fields)}")
        parsed = checked(model, block, f"{section}.", lambda problem: ConfigError(path, problem))
        out[key] = {k: getattr(parsed, k) for k in block}
    return out


def checked(model: type[dg.ConfigurableResource], values: dict[str, Any], where: str,
            error: Callable[[str], Exception] = ValueError) -> dg.ConfigurableResource:
    """model(**values), or error("<where><setting>: <problem>") for the first problem pydantic found."""
    try:
        return model(**values)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        got = f" (got {first['input']!r})" if loc and "input" in first else ""
        raise error(f"{where}{loc}: {msg}{got}" if loc else f"{where.rstrip('.')}: {msg}") from None
