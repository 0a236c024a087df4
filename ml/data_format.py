"""The dataset format: one file per dataset (CSV, JSONL or Parquet) plus one YAML of per-dataset settings.

A dataset file has `text`, optional `text_pair`, `label` and optional `split` (train/validation/test; when
absent we draw a seeded, label-stratified split). Everything a user can get wrong is checked here and reported
as one DatasetError (one line: the file, the row where there is one, and the problem); nothing downstream
re-validates. What a file may hold is bounded by `InputLimits` (over a bound is an error, never a silent cut).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import stat
import string
from collections import Counter
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
MAX_CONFIG_BYTES = 1 << 20  # the settings YAML is hand-written: a megabyte is already absurd


class DatasetError(ValueError):
    """A problem with one input file, with where it is; its message is one line."""

    def __init__(self, file: str | Path, problem: str, row: int | None = None):
        # Library messages (YAML, Parquet) span lines: the CLI prints one line per bad input.
        self.file, self.row, self.problem = str(file), row, " ".join(str(problem).split())
        where = f"{self.file}, row {row}" if row is not None else self.file
        super().__init__(f"{where}: {self.problem}")


class ConfigError(DatasetError):
    """A problem in a YAML settings file (datasets.yaml, the project settings file)."""


class LimitError(DatasetError):
    """A file over one of the InputLimits."""


@dataclass(frozen=True)
class InputLimits:
    """What one dataset file may hold; the defaults suit classification datasets on one machine.

    max_file_bytes: size of the file on disk, checked before it is read (256 MiB).
    max_rows: data rows in one file (1,000,000).
    max_text_bytes: UTF-8 bytes of one `text` or `text_pair` after whitespace is collapsed (100 kB, some 25k
        tokens: far past what a prompt is cut to; one 20 MB text once cost 716 s and 7.7 GB of memory).
    max_label_bytes: UTF-8 bytes of one label value (a class name; a long one means the columns are swapped).
    max_classes: distinct labels in one dataset.
    min_train_per_class: train rows every class present in the file needs (a class missing from train cannot
        be learned, only scored).
    missing_labels: label values (compared lower-case) that mean "missing" in some tool's export and are refused,
        unless the dataset's label_words names the value as a class.
    """

    max_file_bytes: int = 256 * 2**20
    max_rows: int = 1_000_000
    max_text_bytes: int = 100_000
    max_label_bytes: int = 256
    max_classes: int = 100
    min_train_per_class: int = 1
    missing_labels: frozenset[str] = frozenset({"nan", "none", "null", "na", "n/a", "<na>", "nat", "#n/a", "nil"})

    def __post_init__(self) -> None:
        for k in ("max_file_bytes", "max_rows", "max_text_bytes", "max_label_bytes", "max_classes",
                  "min_train_per_class"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"InputLimits.{k} must be a positive integer, got {v!r}")


DEFAULT_LIMITS = InputLimits()


def validate_name(name: str, what: str = "dataset name") -> str:
    """Names reach SQL identifiers and file paths: allow only lower-case identifiers."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"invalid {what} {name!r}: use a lower-case letter then letters, digits or '_' (at most 63)")
    return name


def check_fractions(value: Any, file: str | Path, where: str = "split_fractions") -> tuple[float, float, float]:
    """Three finite, non-negative numbers (train, validation, test) summing to 1, train and validation > 0."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise ConfigError(file, f"{where} must be a list of three numbers (train, validation, test), got {value!r}")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in value):
        raise ConfigError(file, f"{where} must hold numbers, got {list(value)!r}")
    fr = tuple(float(x) for x in value)
    if not all(math.isfinite(x) and x >= 0 for x in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ConfigError(file, f"{where} must be three non-negative numbers summing to 1, got {list(value)!r}")
    if fr[0] <= 0 or fr[1] <= 0:
        raise ConfigError(file, f"{where}: train and validation fractions must be > 0, got {list(value)!r}")
    return fr  # type: ignore[return-value]


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
    """Read and check the YAML of per-dataset settings; a missing file means all defaults. Every value is
    checked here (a ConfigError naming the file and the setting), so for_dataset cannot fail later."""
    if path is None or not Path(path).exists():
        return SuiteConfig({}, {})
    raw = read_yaml(Path(path), _ConfigLoader)
    if not isinstance(raw, dict) or set(raw) - {"defaults", "datasets"}:
        raise ConfigError(path, "expected a mapping with top-level keys 'defaults' and 'datasets' only")
    defaults, datasets = raw.get("defaults") or {}, raw.get("datasets") or {}
    if not isinstance(datasets, dict):
        raise ConfigError(path, f"datasets must be a mapping of dataset name to settings, got a {type(datasets).__name__}")
    for name in datasets:
        try:
            validate_name(str(name))
        except ValueError as e:
            raise ConfigError(path, f"datasets: {e}") from None
    checked = {str(k): _check_block(path, f"datasets.{k}", v) for k, v in datasets.items()}
    return SuiteConfig(_check_block(path, "defaults", defaults), checked)


def read_yaml(path: Path, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """A small hand-written YAML file, safe-loaded; a ConfigError naming the file for any problem reading it."""
    try:
        if not path.is_file():
            raise ConfigError(path, "not a regular file")
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, f"{len(data):,} bytes: a settings file over {MAX_CONFIG_BYTES:,} bytes is refused")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"undecodable bytes (not UTF-8) at byte {e.start}") from None
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        raise ConfigError(path, f"not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(path, "not valid YAML: nested too deeply") from None


def _check_block(path: Path, where: str, block: Any) -> dict[str, Any]:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ConfigError(path, f"{where} must be a mapping")
    unknown = set(block) - _CONFIG_KEYS
    if unknown:
        raise ConfigError(path, f"{where}: unknown setting(s) {sorted(map(str, unknown))}; allowed: {sorted(_CONFIG_KEYS)}")
    out = dict(block)
    for key in ("task_type", "template"):
        if key in block and (not isinstance(block[key], str) or not block[key].strip()):
            raise ConfigError(path, f"{where}.{key} must be a non-empty string, got {block[key]!r}")
    if "template" in block:
        try:
            check_template(block["template"], path, f"{where}.template")
        except DatasetError as e:
            raise ConfigError(path, e.problem) from None
    if "label_words" in block:
        out["label_words"] = _check_label_words(path, f"{where}.label_words", block["label_words"])
    if "split_fractions" in block:
        out["split_fractions"] = check_fractions(block["split_fractions"], path, f"{where}.split_fractions")
    return out


def _check_label_words(path: Path, where: str, words: Any) -> dict[str, str]:
    if words is None:
        return {}
    if not isinstance(words, dict):
        raise ConfigError(path, f"{where} must map each label value to its word, got a {type(words).__name__}")
    out: dict[str, str] = {}
    for k, v in words.items():
        if k is None or isinstance(k, (list, dict)) or not str(k).strip():
            raise ConfigError(path, f"{where}: a label value is empty or not a scalar ({k!r})")
        if not isinstance(v, (str, int, float)) or isinstance(v, bool) or not str(v).strip():
            raise ConfigError(path, f"{where}.{k}: the word must be a non-empty string, got {v!r}")
        out[str(k)] = str(v)
    return out


def check_template(template: str, file: str | Path, where: str = "template") -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:  # unbalanced braces
        raise DatasetError(file, f"{where}: not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    if "text" not in fields:
        raise DatasetError(file, f"{where}: the template must contain {{text}}")
    if fields - {"text", "text_pair"}:
        raise DatasetError(file, f"{where}: unknown placeholder(s) {sorted(fields - {'text', 'text_pair'})}")


def scan(folder: Path) -> tuple[dict[str, Path], list[DatasetError]]:
    """Dataset name -> file for every usable CSV/JSONL/Parquet file in `folder`, and one DatasetError for each
    file that cannot be a dataset: an invalid or duplicate name, a symlink that leaves the folder or is broken,
    something that is not a regular file, an upper-case suffix. Hidden files and other suffixes are ignored."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise DatasetError(folder, f"cannot list the datasets folder: {e.strerror or e}") from None
    root = folder.resolve()
    found: dict[str, Path] = {}
    problems: list[DatasetError] = []
    clashed: set[str] = set()
    for path in entries:
        if path.name.startswith("."):
            continue
        if path.suffix not in SUFFIXES:
            if path.suffix.lower() in SUFFIXES:
                problems.append(DatasetError(path, f"suffix {path.suffix!r} must be lower-case {path.suffix.lower()!r}"))
            continue
        try:
            name = validate_name(path.stem)
        except ValueError as e:
            problems.append(DatasetError(path, str(e)))
            continue
        try:
            _check_entry(path, root)
        except DatasetError as e:
            problems.append(e)
            continue
        if name in found or name in clashed:  # ambiguous: neither file is the dataset
            other = found.pop(name, None)
            clashed.add(name)
            problems.append(DatasetError(path, f"duplicate dataset name {name!r}" + (f": also {other.name}" if other else "")))
            continue
        found[name] = path
    return found, problems


def discover(folder: Path) -> dict[str, Path]:
    """Dataset name -> file, for every CSV/JSONL/Parquet file in `folder`; the first unusable file raises
    (`scan` gives every problem instead, so the other datasets can go on)."""
    found, problems = scan(folder)
    if problems:
        raise problems[0]
    return found


def _check_entry(path: Path, root: Path) -> None:
    """A dataset file must be a regular file inside the datasets folder, also when it is a symlink."""
    target = path
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise DatasetError(path, "broken symlink (its target does not exist, or the links loop)") from None
        if not target.is_relative_to(root):
            raise DatasetError(path, f"symlink to {target}, outside the datasets folder {root}: refused "
                                     "(copy the file into the folder instead)")
    try:
        mode = target.stat().st_mode
    except OSError as e:
        raise DatasetError(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise DatasetError(path, "not a regular file" + (" (a folder)" if stat.S_ISDIR(mode) else ""))



def read_table(path: Path, limits: InputLimits = DEFAULT_LIMITS) -> pd.DataFrame:
    """Read a dataset file as a table of raw cells, within `limits`. Rows are numbered from 1 in errors and
    count data rows only (a CSV's header is not a row)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DatasetError(path, f"unsupported file type {path.suffix!r}: use one of {', '.join(SUFFIXES)}")
    try:
        st = path.stat()
    except OSError as e:
        raise DatasetError(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(path, "not a regular file")
    if st.st_size == 0:
        raise DatasetError(path, "empty file (0 bytes)")
    if st.st_size > limits.max_file_bytes:
        raise LimitError(path, f"{st.st_size:,} bytes: over the limit of {limits.max_file_bytes:,} bytes per file "
                               "(InputLimits.max_file_bytes)")
    if path.suffix == ".parquet":
        df = _read_parquet(path, limits)
    else:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DatasetError(path, f"cannot read: {e.strerror or e}") from None
        text = _decode(raw, path)
        df = _read_csv(text, path, limits) if path.suffix == ".csv" else _read_jsonl(text, path, limits)
    if len(df) == 0:
        raise DatasetError(path, "no data rows" + (" (a header only)" if path.suffix == ".csv" and len(df.columns) else ""))
    return df


def _line_to_row(path: Path, line: int) -> int | None:
    """Data row of a text line: a CSV's line 1 is its header (no row); a JSONL line is a row."""
    if path.suffix != ".csv":
        return line
    return line - 1 if line > 1 else None


def _decode(raw: bytes, path: Path) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(path, f"undecodable bytes (not UTF-8) at byte {e.start}", row=_line_to_row(path, line)) from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise DatasetError(path, f"NUL byte at line {line} (text files hold none: is it binary, or UTF-16?)",
                           row=_line_to_row(path, line))
    return text


def _read_csv(text: str, path: Path, limits: InputLimits) -> pd.DataFrame:
    # Python's csv, not pandas: a row with too many fields would silently shift columns into an index there.
    # The field limit only has to admit the longest allowed text; a longer field is over max_text_bytes anyway.
    csv.field_size_limit(max(csv.field_size_limit(), limits.max_text_bytes + 1))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    try:
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if header is None:
                header = [f.strip() for f in fields]
                dup = sorted({c for c in header if c and header.count(c) > 1})
                if dup:
                    raise DatasetError(path, f"duplicate column(s) {dup} in the header")
                continue
            if len(fields) != len(header):
                raise DatasetError(path, f"{len(fields)} field(s) where the header has {len(header)} "
                                         f"(line {reader.line_num}; quote fields that contain commas)", row=len(rows) + 1)
            rows.append(fields)
            if len(rows) > limits.max_rows:
                raise LimitError(path, f"more than {limits.max_rows:,} rows (InputLimits.max_rows)")
    except csv.Error as e:
        if "field larger than field limit" in str(e):
            raise LimitError(path, f"a field longer than {limits.max_text_bytes:,} characters (line {reader.line_num}); "
                                   "the limit per text is InputLimits.max_text_bytes", row=len(rows) + 1) from None
        raise DatasetError(path, f"malformed CSV at line {reader.line_num}: {e}", row=len(rows) + 1) from None
    if header is None:
        raise DatasetError(path, "no header row (the file is blank)")
    return pd.DataFrame(rows, columns=header, dtype=object)


def _read_jsonl(text: str, path: Path, limits: InputLimits) -> pd.DataFrame:
    rows = []
    # Split on "\n" only: str.splitlines() would also cut at U+2028 and friends, which JSON strings may hold raw.
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DatasetError(path, f"invalid JSON: {getattr(e, 'msg', 'nested too deeply')}", row=i) from None
        if not isinstance(obj, dict):
            raise DatasetError(path, "each line must be a JSON object", row=i)
        rows.append(obj)
        if len(rows) > limits.max_rows:
            raise LimitError(path, f"more than {limits.max_rows:,} rows (InputLimits.max_rows)")
    return pd.DataFrame(rows, dtype=object)


def _read_parquet(path: Path, limits: InputLimits) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        n = pf.metadata.num_rows
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DatasetError(path, f"cannot read Parquet: {e}") from None
    if n > limits.max_rows:
        raise LimitError(path, f"{n:,} rows: over the limit of {limits.max_rows:,} (InputLimits.max_rows)")
    try:
        return pf.read().to_pandas()
    except Exception as e:
        raise DatasetError(path, f"cannot read Parquet: {e}") from None


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _cell(value: Any, path: Path, row: int, column: str) -> str | None:
    """One raw cell as text with whitespace collapsed (None when missing); refuses non-scalars and NUL bytes."""
    if _missing(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(path, f"{column}: undecodable bytes (not UTF-8) at byte {e.start}", row=row) from None
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)  # a numeric column with a gap reads as float: label 1 must stay "1", not "1.0"
    elif isinstance(value, (list, tuple, dict, set, np.ndarray)):
        raise DatasetError(path, f"{column}: expected text, got a {type(value).__name__}", row=row)
    s = str(value)
    if "\x00" in s:
        raise DatasetError(path, f"{column}: NUL byte", row=row)
    return " ".join(s.split()) or None  # collapse whitespace: prompts should not depend on stray newlines


def _column(df: pd.DataFrame, column: str, path: Path, max_bytes: int) -> list[str | None]:
    out = []
    for i, v in enumerate(df[column].tolist(), start=1):
        s = _cell(v, path, i, column)
        if s is not None and len(s) * 4 > max_bytes and len(s.encode("utf-8")) > max_bytes:
            raise LimitError(path, f"{column}: {len(s.encode('utf-8')):,} bytes, over the limit of {max_bytes:,}",
                             row=i)
        out.append(s)
    return out


def normalize(df: pd.DataFrame, path: Path, config: DatasetConfig, *, seed: int = 0,
              limits: InputLimits = DEFAULT_LIMITS) -> pd.DataFrame:
    """Validate a raw table and return the canonical one: example_id, text, text_pair, label, label_id, split."""
    df = df.rename(columns=lambda c: str(c).strip())
    if df.columns.duplicated().any():
        raise DatasetError(path, f"duplicate column(s) {sorted(set(df.columns[df.columns.duplicated()]))}")
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing:
        raise DatasetError(path, f"missing column(s) {missing}; found {list(df.columns)}")
    if len(df) == 0:
        raise DatasetError(path, "no data rows")
    if len(df) > limits.max_rows:
        raise LimitError(path, f"{len(df):,} rows: over the limit of {limits.max_rows:,} (InputLimits.max_rows)")
    check_template(config.template, path)
    fractions = check_fractions(config.split_fractions, path, f"split_fractions of {config.name!r}")
    texts = _column(df, "text", path, limits.max_text_bytes)
    pairs = _column(df, "text_pair", path, limits.max_text_bytes) if "text_pair" in df.columns else [None] * len(df)
    labels = _column(df, "label", path, limits.max_label_bytes)
    for i, (t, lab) in enumerate(zip(texts, labels), start=1):
        if t is None:
            raise DatasetError(path, "empty text", row=i)
        if lab is None:
            raise DatasetError(path, "empty label", row=i)
        if lab.lower() in limits.missing_labels and lab not in config.label_words:
            raise DatasetError(path, f"label {lab!r} reads as a missing value: fill it in or drop the row "
                                     "(name it in label_words if it is a real class)", row=i)
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
    if len(classes) > limits.max_classes:
        raise LimitError(path, f"{len(classes):,} distinct labels, over the limit of {limits.max_classes} "
                               "(InputLimits.max_classes): is the label column the right one?")
    words = config.words_for(classes)
    if len(set(w.strip().lower() for w in words)) != len(words):
        raise DatasetError(path, f"label words are not distinct: {words}")

    splits = _read_splits(df, path) if "split" in df.columns else None
    out = pd.DataFrame({"text": texts, "text_pair": pairs, "label": labels})
    out["label_id"] = [classes.index(lab) for lab in labels]
    out["example_id"] = _example_ids(config.name, out)
    out["split"] = splits if splits is not None else stratified_split(out["label_id"].to_numpy(), fractions, seed)
    out["dataset"] = config.name
    out["prompt"] = [render(config.template, t, p) for t, p in zip(texts, pairs)]
    for s in ("train", "validation"):
        if not (out["split"] == s).any():
            raise DatasetError(path, f"no {s} examples: a dataset needs train and validation rows")
    in_train = Counter(lab for lab, s in zip(labels, out["split"]) if s == "train")
    short = {c: in_train[c] for c in present if in_train[c] < limits.min_train_per_class}
    if short:
        raise DatasetError(path, f"train split lacks class(es): {short} train rows "
                                 f"(each class needs at least {limits.min_train_per_class}; "
                                 f"{int((out['split'] == 'train').sum())} train rows in all)")
    return out[COLUMNS]


def _read_splits(df: pd.DataFrame, path: Path) -> list[str]:
    out = []
    for i, v in enumerate(df["split"].tolist(), start=1):
        s = SPLIT_ALIASES.get((_cell(v, path, i, "split") or "").lower())
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
                 first_token: Callable[[str], int] | None = None,
                 limits: InputLimits = DEFAULT_LIMITS) -> pd.DataFrame:
    """Read, validate and normalize one dataset file; any problem is one DatasetError naming the file (and row).
    `first_token` maps a label word to its first token id, so label words that a tokenizer cannot tell apart
    are caught here, before anything is written."""
    df = normalize(read_table(path, limits), Path(path), config, seed=seed, limits=limits)
    if first_token is not None:
        check_label_tokens(path, config, classes_for(df, config), first_token)
    return df


def check_label_tokens(path: Path, config: DatasetConfig, classes: list[str], first_token: Callable[[str], int]) -> None:
    words = config.words_for(classes)
    owner: dict[int, str] = {}
    for w in words:
        try:
            tok = first_token(w)
        except ValueError as e:  # e.g. a word the tokenizer turns into nothing
            raise DatasetError(path, f"label word {w!r}: {e}; change label_words in the config") from None
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
