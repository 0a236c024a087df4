"""The dataset format: one file per dataset (CSV, JSONL or Parquet) plus one YAML of per-dataset settings.

A dataset file has `text`, optional `text_pair`, `label` and optional `split` (train/validation/test; when
absent we draw a seeded, label-stratified split). Everything a user can get wrong is checked here and reported
with the file, the row and the problem; nothing downstream re-validates.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from grouplora.ml.prompts import render

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
SUFFIXES = (".csv", ".jsonl", ".parquet")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
DEFAULT_TEMPLATE = "{text}\nAnswer:"
COLUMNS = ["dataset", "example_id", "text", "text_pair", "label", "label_id", "split", "prompt"]


class DatasetError(ValueError):
    """A problem with one dataset file, with where it is."""

    def __init__(self, file: str | Path, problem: str, row: int | None = None):
        self.file, self.row, self.problem = str(file), row, problem
        where = f"{self.file}, row {row}" if row is not None else self.file
        super().__init__(f"{where}: {problem}")


def validate_name(name: str, what: str = "dataset name") -> str:
    """Names reach SQL identifiers and file paths: allow only lower-case identifiers."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"invalid {what} {name!r}: use a lower-case letter then letters, digits or '_' (at most 63)")
    return name


@dataclass(frozen=True)
class DatasetConfig:
    """Per-dataset settings; `label_words` maps each label value to the word the model should answer."""

    name: str
    task_type: str = "classification"
    template: str = DEFAULT_TEMPLATE
    label_words: dict[str, str] = field(default_factory=dict)
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def words_for(self, labels: list[str]) -> list[str]:
        return [self.label_words.get(lab, f" {lab}") for lab in labels]

    def fingerprint(self) -> str:
        blob = json.dumps([self.task_type, self.template, sorted(self.label_words.items()), self.split_fractions])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SuiteConfig:
    defaults: dict[str, Any]
    datasets: dict[str, dict[str, Any]]

    def for_dataset(self, name: str) -> DatasetConfig:
        merged = {**self.defaults, **self.datasets.get(name, {})}
        merged.pop("name", None)
        if "split_fractions" in merged:
            merged["split_fractions"] = tuple(float(x) for x in merged["split_fractions"])
        if "label_words" in merged:
            merged["label_words"] = {str(k): str(v) for k, v in (merged["label_words"] or {}).items()}
        return DatasetConfig(name=name, **merged)


_CONFIG_KEYS = {"task_type", "template", "label_words", "split_fractions"}


class _ConfigLoader(yaml.SafeLoader):
    """YAML without implicit booleans: label values such as yes/no/true/off must stay the strings they are."""


_ConfigLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def load_suite_config(path: Path | None) -> SuiteConfig:
    """Read the YAML of per-dataset settings; a missing file means all defaults."""
    if path is None or not Path(path).exists():
        return SuiteConfig({}, {})
    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
    except yaml.YAMLError as e:
        raise DatasetError(path, f"not valid YAML: {e}") from e
    if not isinstance(raw, dict) or set(raw) - {"defaults", "datasets"}:
        raise DatasetError(path, "expected top-level keys 'defaults' and 'datasets' only")
    defaults, datasets = raw.get("defaults") or {}, raw.get("datasets") or {}
    for where, block in [("defaults", defaults), *[(f"datasets.{k}", v) for k, v in datasets.items()]]:
        if not isinstance(block, dict):
            raise DatasetError(path, f"{where} must be a mapping")
        unknown = set(block) - _CONFIG_KEYS
        if unknown:
            raise DatasetError(path, f"{where}: unknown setting(s) {sorted(unknown)}; allowed: {sorted(_CONFIG_KEYS)}")
        if "template" in block:
            check_template(str(block["template"]), path, where)
    for name in datasets:
        validate_name(str(name))
    return SuiteConfig(defaults, {str(k): v for k, v in datasets.items()})


def check_template(template: str, file: str | Path, where: str = "template") -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if "text" not in fields:
        raise DatasetError(file, f"{where}: the template must contain {{text}}")
    if fields - {"text", "text_pair"}:
        raise DatasetError(file, f"{where}: unknown placeholder(s) {sorted(fields - {'text', 'text_pair'})}")


def discover(folder: Path) -> dict[str, Path]:
    """Dataset name -> file, for every CSV/JSONL/Parquet file in `folder`."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in SUFFIXES or path.name.startswith("."):
            continue
        name = path.stem
        try:
            validate_name(name)
        except ValueError as e:
            raise DatasetError(path, str(e)) from None
        if name in found:
            raise DatasetError(path, f"duplicate dataset name {name!r}: also {found[name].name}")
        found[name] = path
    return found





def read_table(path: Path) -> pd.DataFrame:
    """Read a dataset file as strings; rows are numbered from 1 in errors (CSV: the header is line 1)."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DatasetError(path, f"cannot read Parquet: {e}") from e
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        row = line - 1 if path.suffix == ".csv" else line
        raise DatasetError(path, f"undecodable bytes (not UTF-8) at byte {e.start}", row=row) from None
    if path.suffix == ".csv":
        try:
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[])
        except pd.errors.ParserError as e:
            raise DatasetError(path, f"malformed CSV: {e}") from e
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(path, f"invalid JSON: {e.msg}", row=i) from None
        if not isinstance(obj, dict):
            raise DatasetError(path, "each line must be a JSON object", row=i)
        rows.append(obj)
    return pd.DataFrame(rows)


def _as_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    s = " ".join(str(value).split())  # collapse whitespace: prompts should not depend on stray newlines
    return s or None


def normalize(df: pd.DataFrame, path: Path, config: DatasetConfig, *, seed: int = 0) -> pd.DataFrame:
    """Validate a raw table and return the canonical one: example_id, text, text_pair, label, label_id, split."""
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing:
        raise DatasetError(path, f"missing column(s) {missing}; found {list(df.columns)}")
    check_template(config.template, path)
    texts = [_as_text(v) for v in df["text"]]
    pairs = [_as_text(v) for v in df["text_pair"]] if "text_pair" in df.columns else [None] * len(df)
    labels = [_as_text(v) for v in df["label"]]
    for i, (t, lab) in enumerate(zip(texts, labels), start=1):
        if t is None:
            raise DatasetError(path, "empty text", row=i)
        if lab is None:
            raise DatasetError(path, "empty label", row=i)
    uses_pair = "{text_pair}" in config.template
    if uses_pair and any(p is None for p in pairs):
        row = next(i for i, p in enumerate(pairs, start=1) if p is None)
        raise DatasetError(path, "the template uses {text_pair} but text_pair is empty", row=row)

    classes = list(config.label_words) if config.label_words else sorted(set(labels))
    unknown = [(i, lab) for i, lab in enumerate(labels, start=1) if lab not in classes]
    if unknown:
        i, lab = unknown[0]
        raise DatasetError(path, f"label {lab!r} has no entry in label_words {sorted(classes)}", row=i)
    present = sorted(set(labels))
    if len(present) < 2:
        raise DatasetError(path, f"only one class ({present[0]!r}): a classifier needs at least two")
    words = config.words_for(classes)
    if len(set(w.strip().lower() for w in words)) != len(words):
        raise DatasetError(path, f"label words are not distinct: {words}")

    splits = _read_splits(df, path) if "split" in df.columns else None
    out = pd.DataFrame({"text": texts, "text_pair": pairs, "label": labels})
    out["label_id"] = [classes.index(lab) for lab in labels]
    out["example_id"] = _example_ids(config.name, out)
    out["split"] = splits if splits is not None else stratified_split(out["label_id"].to_numpy(), config.split_fractions, seed)
    out["dataset"] = config.name
    out["prompt"] = [render(config.template, t, p) for t, p in zip(texts, pairs)]
    for s in ("train", "validation"):
        if not (out["split"] == s).any():
            raise DatasetError(path, f"no {s} examples: a dataset needs train and validation rows")
    return out[COLUMNS]


def _read_splits(df: pd.DataFrame, path: Path) -> list[str]:
    out = []
    for i, v in enumerate(df["split"], start=1):
        s = SPLIT_ALIASES.get((_as_text(v) or "").lower())
        if s is None:
            raise DatasetError(path, f"split {v!r} is not one of {list(SPLITS)}", row=i)
        out.append(s)
    return out


def _example_ids(name: str, df: pd.DataFrame) -> list[str]:
    """Content-addressed ids, so an example keeps its id when other rows change; repeats get a counter."""
    seen: dict[str, int] = {}
    ids = []
    for t, p, lab in zip(df["text"], df["text_pair"], df["label"]):
        h = hashlib.sha1(f"{t}\x1f{p or ''}\x1f{lab}".encode()).hexdigest()[:12]
        n = seen.get(h, 0)
        seen[h] = n + 1
        ids.append(f"{name}:{h}" + (f":{n}" if n else ""))
    return ids


def stratified_split(label_ids: np.ndarray, fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Per class, a seeded shuffle cut by `fractions`; every class with ≥3 examples reaches every split."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    out = np.empty(len(label_ids), dtype=object)
    for c in np.unique(label_ids):
        idx = np.flatnonzero(label_ids == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_val = max(1, round(n * fractions[1])) if n >= 3 and fractions[1] > 0 else 0
        n_test = max(1, round(n * fractions[2])) if n >= 3 and fractions[2] > 0 else 0
        n_train = n - n_val - n_test
        out[idx[:n_train]] = "train"
        out[idx[n_train:n_train + n_val]] = "validation"
        out[idx[n_train + n_val:]] = "test"
    return out.tolist()


def load_dataset(path: Path, config: DatasetConfig, *, seed: int = 0,
                 first_token: Callable[[str], int] | None = None) -> pd.DataFrame:
    """Read, validate and normalize one dataset file. `first_token` maps a label word to its first token id,
    so label words that a tokenizer cannot tell apart are caught here, before anything is written."""
    df = normalize(read_table(path), Path(path), config, seed=seed)
    if first_token is not None:
        check_label_tokens(path, config, classes_for(df, config), first_token)
    return df


def check_label_tokens(path: Path, config: DatasetConfig, classes: list[str], first_token: Callable[[str], int]) -> None:
    words = config.words_for(classes)
    owner: dict[int, str] = {}
    for w in words:
        tok = first_token(w)
        if tok in owner:
            raise DatasetError(path, f"label words {owner[tok]!r} and {w!r} start with the same token ({tok}): "
                                     "the model could not tell them apart; change label_words in the config")
        owner[tok] = w


def classes_for(df: pd.DataFrame, config: DatasetConfig) -> list[str]:
    """Label values in label_id order: the config's order when it names them, else sorted."""
    return list(config.label_words) if config.label_words else sorted(set(df["label"]))


def dataset_card(df: pd.DataFrame, config: DatasetConfig, source_hash: str) -> dict[str, Any]:
    """What downstream steps need besides the rows: classes, their words, the template, and versions."""
    classes = classes_for(df, config)
    return {"name": config.name, "task_type": config.task_type, "template": config.template,
            "classes": classes, "label_words": config.words_for(classes), "source_sha256": source_hash,
            "config_fingerprint": config.fingerprint(),
            "counts": {s: int((df["split"] == s).sum()) for s in SPLITS}}
