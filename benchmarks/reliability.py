"""Reliability probe: try to break grouplora as an operator would, and count what went wrong.

Sections, each writing its keys into one benchmarks/results/reliability.json (a section not run keeps the values
of its last run, or null; each section records the commit and time it ran at):

| section          | keys                                            | what it does                                          |
|------------------|-------------------------------------------------|-------------------------------------------------------|
| bad_inputs       | bad_inputs_tried, bad_inputs_unclear            | every case of the bad-input corpus through the same validation the `dataset` asset runs (discover, load_suite_config, sha256_file, load_dataset with the tokenizer check); plus controls that must pass |
| cli_bad_inputs   | tracebacks, data_lost                           | a sample of the corpus (--cli-cases all: every case) through `grouplora run` beside three good datasets on one home: exit 2, one line naming the file (and row), no traceback; the good datasets' stored artifacts byte-identical; a good file last (the control) |
| kill             | kill_trials, kill_consistent, stale_runs_left   | kill -9 of `grouplora run` at each stage (first initialization of a new home, validation, each per-dataset step, the suite's steps, adapter training, the ensemble, registration, promotion), each on a used home with one dataset changed; one rerun; then the home's records: every partition, the suite and the ensemble current, adapters readable, results and registry complete, nothing left STARTED/RUNNING/PENDING/half-registered |
| concurrency      | concurrent_runs, concurrent_broken_homes        | 2-3 `grouplora run` started together (or seconds apart) on new and on used homes; a home is broken if a run failed, anything was left behind, or the home is not consistent after; repeated work is counted |
| promotion        | worse_promoted                                  | real ensembles registered with chosen validation figures (worse than the champion, tied, below a baseline, NaN; controls that must win), `grouplora promote` on each; and the champion a real pipeline run chose, against its recorded baselines |

A bad-input case is *clear* when it raises a DatasetError whose one-line message names the offending file (and
the row, where the case has one); *unclear* when it raises anything else, or a message without the file or row;
*accepted wrongly* when nothing is raised. `bad_inputs_unclear` counts both unclear and accepted-wrongly cases
(everything that was not a clear rejection); the section's details break it down per case.

    python benchmarks/reliability.py                          # every section (about an hour on the shared 2-core box)
    python benchmarks/reliability.py --sections bad_inputs   # one section; the others keep their last results
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "reliability.json"

# ----------------------------------------------------------------------------------------------- the corpus

# A small, valid, real-looking dataset: short film reviews (the shape of rotten_tomatoes), and a neighbour.
REVIEWS = [
    ("A gorgeous, moving film that earns every one of its tears.", "positive"),
    ("The plot is thin, the jokes are stale and the ending drags on forever.", "negative"),
    ("Sharp writing and two terrific lead performances.", "positive"),
    ("I checked my watch three times before the first act was over.", "negative"),
    ("A warm, funny and surprisingly wise comedy about growing old.", "positive"),
    ("Loud, incoherent and about forty minutes too long.", "negative"),
    ("The cinematography alone is worth the price of a ticket.", "positive"),
    ("A lazy sequel that recycles every idea of the original.", "negative"),
    ("Quietly devastating; the final scene stayed with me for days.", "positive"),
    ("Wooden dialogue, flat characters, and no sense of pace.", "negative"),
    ("An inventive thriller that keeps you guessing until the end.", "positive"),
    ("Even the talented cast cannot rescue this muddled script.", "negative"),
    ("Smart, tender and beautifully acted from start to finish.", "positive"),
    ("A tedious exercise in style over substance.", "negative"),
    ("The best animated feature of the year, for kids and adults alike.", "positive"),
    ("Predictable twists and a soundtrack that never shuts up.", "negative"),
    ("A bold, confident debut from a director to watch.", "positive"),
    ("It mistakes noise for excitement and cruelty for wit.", "negative"),
    ("Funny, humane and never once condescending to its audience.", "positive"),
    ("A forgettable mess that wastes a promising premise.", "negative"),
    ("The chemistry between the leads makes it soar.", "positive"),
    ("Two hours of my life I will never get back.", "negative"),
    ("A rare blockbuster with both brains and heart.", "positive"),
    ("Clumsy, preachy and painfully slow.", "negative"),
]
NEIGHBOUR = [
    ("The soundtrack is a joy and the story flies by.", "positive"),
    ("A muddled, joyless slog with nothing to say.", "negative"),
    ("Charming and clever, with a great final twist.", "positive"),
    ("The effects look cheap and the acting is worse.", "negative"),
] * 4
CONFIG = ("datasets:\n"
          "  reviews:\n    task_type: sentiment\n    label_words: {positive: ' positive', negative: ' negative'}\n"
          "  movies:\n    task_type: sentiment\n    label_words: {positive: ' positive', negative: ' negative'}\n")
BAD = "reviews"  # the name of the file each case breaks


@dataclass(frozen=True)
class Expect:
    """What validation must do with a case's folder: reject it naming `file` (and `row`), or accept it (file None)."""

    file: Path | None
    row: int | None = None


CASES: list[tuple[str, str, Callable[[Path], Expect]]] = []  # (name, group, builder)


def case(group: str) -> Callable:
    def register(fn: Callable[[Path], Expect]) -> Callable[[Path], Expect]:
        CASES.append((fn.__name__, group, fn))
        return fn
    return register


def rows_of(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"text": t, "label": lab} for t, lab in pairs]


def good_rows() -> list[dict[str, Any]]:
    return rows_of(REVIEWS)


def write_csv(path: Path, rows: list[dict[str, Any]], header: list[str] | None = None) -> Path:
    header = header or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(c, "") for c in header])
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]] | pd.DataFrame) -> Path:
    (rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)).to_parquet(path, index=False)
    return path


def base_folder(folder: Path) -> None:
    """The good neighbour dataset and the settings file: each case adds or breaks `reviews`."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "movies.csv", rows_of(NEIGHBOUR))
    (folder / "datasets.yaml").write_text(CONFIG)


def with_row(i: int, **change: Any) -> list[dict[str, Any]]:
    """The good rows with data row i (1-based) changed."""
    rows = good_rows()
    rows[i - 1] = {**rows[i - 1], **change}
    return rows


# --- controls: valid inputs that must be accepted (a probe that rejects everything would score "clear")

@case("control")
def control_csv(d: Path) -> Expect:
    write_csv(d / f"{BAD}.csv", good_rows())
    return Expect(None)


@case("control")
def control_jsonl(d: Path) -> Expect:
    write_jsonl(d / f"{BAD}.jsonl", good_rows())
    return Expect(None)


@case("control")
def control_parquet(d: Path) -> Expect:
    write_parquet(d / f"{BAD}.parquet", good_rows())
    return Expect(None)


@case("control")
def control_crlf_bom_quoted_newlines(d: Path) -> Expect:
    rows = with_row(3, text='Sharp writing, "two" terrific\nlead performances.')
    buf = "\ufefftext,label\r\n" + "".join(
        '"' + r["text"].replace('"', '""') + '",' + r["label"] + "\r\n" for r in rows)
    (d / f"{BAD}.csv").write_text(buf, encoding="utf-8", newline="")
    return Expect(None)


@case("control")
def control_nan_label_named_in_label_words(d: Path) -> Expect:
    rows = [{**r, "label": "NaN" if r["label"] == "negative" else r["label"]} for r in good_rows()]
    write_csv(d / f"{BAD}.csv", rows)
    (d / "datasets.yaml").write_text(CONFIG.replace("{positive: ' positive', negative: ' negative'}\n  movies",
                                                    "{positive: ' positive', NaN: ' negative'}\n  movies"))
    return Expect(None)


@case("control")
def control_symlink_inside_folder(d: Path) -> Expect:
    (d / "sub").mkdir()
    write_csv(d / "sub" / "real.csv", good_rows())
    (d / f"{BAD}.csv").symlink_to(d / "sub" / "real.csv")
    return Expect(None)


@case("control")
def control_extra_columns_and_spaced_header(d: Path) -> Expect:
    rows = [{" text ": r["text"], " label": r["label"], "source": "web"} for r in good_rows()]
    write_csv(d / f"{BAD}.csv", rows)
    return Expect(None)


@case("control")
def control_jsonl_with_unicode_line_separators(d: Path) -> Expect:
    write_jsonl(d / f"{BAD}.jsonl", with_row(2, text="Plot twist:\u2028the butler\u2029did it\x0c\x1c."))
    (d / f"{BAD}.jsonl").write_text((d / f"{BAD}.jsonl").read_text().replace("\\u2028", "\u2028"), encoding="utf-8")
    return Expect(None)


@case("control")
def control_integer_labels(d: Path) -> Expect:
    rows = [{"text": r["text"], "label": int(r["label"] == "positive")} for r in good_rows()]
    write_parquet(d / f"{BAD}.parquet", rows)
    (d / "datasets.yaml").write_text(CONFIG.replace("{positive: ' positive', negative: ' negative'}\n  movies",
                                                    "{1: ' positive', 0: ' negative'}\n  movies"))
    return Expect(None)


# --- whole files

@case("file")
def empty_csv(d: Path) -> Expect:
    (d / f"{BAD}.csv").write_bytes(b"")
    return Expect(d / f"{BAD}.csv")


@case("file")
def empty_jsonl(d: Path) -> Expect:
    (d / f"{BAD}.jsonl").write_bytes(b"")
    return Expect(d / f"{BAD}.jsonl")


@case("file")
def empty_parquet(d: Path) -> Expect:
    (d / f"{BAD}.parquet").write_bytes(b"")
    return Expect(d / f"{BAD}.parquet")


@case("file")
def header_only_csv(d: Path) -> Expect:
    (d / f"{BAD}.csv").write_text("text,label\n")
    return Expect(d / f"{BAD}.csv")


@case("file")
def blank_lines_csv(d: Path) -> Expect:
    (d / f"{BAD}.csv").write_text("\n\n  \n")
    return Expect(d / f"{BAD}.csv")


@case("file")
def blank_lines_jsonl(d: Path) -> Expect:
    (d / f"{BAD}.jsonl").write_text("\n \n\n")
    return Expect(d / f"{BAD}.jsonl")


@case("file")
def zero_row_parquet(d: Path) -> Expect:
    write_parquet(d / f"{BAD}.parquet", pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=str)}))
    return Expect(d / f"{BAD}.parquet")


@case("file")
def latin1_csv(d: Path) -> Expect:
    rows = with_row(5, text="Un film très émouvant.")
    p = d / f"{BAD}.csv"
    write_csv(p, rows)
    p.write_bytes(p.read_text(encoding="utf-8").encode("latin-1"))
    return Expect(p, row=5)


@case("file")
def utf16_csv_with_bom(d: Path) -> Expect:
    p = d / f"{BAD}.csv"
    write_csv(p, good_rows())
    p.write_bytes(p.read_text(encoding="utf-8").encode("utf-16"))
    return Expect(p)


@case("file")
def utf16_csv_without_bom(d: Path) -> Expect:
    p = d / f"{BAD}.csv"
    write_csv(p, good_rows())
    p.write_bytes(p.read_text(encoding="utf-8").encode("utf-16-le"))
    return Expect(p)


@case("file")
def random_bytes_named_csv(d: Path) -> Expect:
    import random

    (d / f"{BAD}.csv").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    return Expect(d / f"{BAD}.csv")


@case("file")
def gzip_named_csv(d: Path) -> Expect:
    p = d / f"{BAD}.csv"
    write_csv(d / "tmp.txt", good_rows())
    p.write_bytes(gzip.compress((d / "tmp.txt").read_bytes()))
    (d / "tmp.txt").unlink()
    return Expect(p)


@case("file")
def parquet_bytes_named_csv(d: Path) -> Expect:
    write_parquet(d / "x.bin", good_rows())
    (d / "x.bin").rename(d / f"{BAD}.csv")
    return Expect(d / f"{BAD}.csv")


@case("file")
def csv_text_named_parquet(d: Path) -> Expect:
    write_csv(d / f"{BAD}.parquet", good_rows())
    return Expect(d / f"{BAD}.parquet")


@case("file")
def parquet_truncated(d: Path) -> Expect:
    p = write_parquet(d / f"{BAD}.parquet", good_rows())
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return Expect(p)


@case("file")
def parquet_footer_length_wrong(d: Path) -> Expect:
    p = write_parquet(d / f"{BAD}.parquet", good_rows())
    b = bytearray(p.read_bytes())
    b[-8:-4] = (len(b) * 2).to_bytes(4, "little")  # the footer claims to be longer than the file
    p.write_bytes(bytes(b))
    return Expect(p)


@case("file")
def parquet_schema_scribbled(d: Path) -> Expect:
    p = write_parquet(d / f"{BAD}.parquet", good_rows())
    b = bytearray(p.read_bytes())
    footer = int.from_bytes(b[-8:-4], "little")
    start = len(b) - 8 - footer
    b[start:start + 24] = b"\xff" * 24  # the start of the footer: the schema (Thrift)
    p.write_bytes(bytes(b))
    return Expect(p)


@case("file")
def parquet_data_page_corrupted(d: Path) -> Expect:
    p = d / f"{BAD}.parquet"
    pd.DataFrame(good_rows()).to_parquet(p, index=False, compression="snappy")
    b = bytearray(p.read_bytes())
    for i in range(8, min(len(b) // 3, 400)):  # scribble over the first column chunk's pages
        b[i] = 0xFF
    p.write_bytes(bytes(b))
    return Expect(p)


@case("file")
def parquet_magic_only(d: Path) -> Expect:
    (d / f"{BAD}.parquet").write_bytes(b"PAR1" + b"\x00" * 16 + b"PAR1")
    return Expect(d / f"{BAD}.parquet")


@case("file")
def file_over_max_bytes(d: Path) -> Expect:
    p = d / f"{BAD}.csv"
    write_csv(p, good_rows())
    os.truncate(p, 300 * 2**20)  # sparse: 300 MiB on paper, nothing on disk; read it and it is NULs
    return Expect(p)


@case("file")
def rows_over_max_rows(d: Path) -> Expect:
    p = d / f"{BAD}.csv"
    with open(p, "w") as f:
        f.write("text,label\n")
        f.write("great film,positive\nawful film,negative\n" * 500_001)
    return Expect(p)


# --- the folder: names, links, things that are not files

@case("folder")
def invalid_file_name(d: Path) -> Expect:
    write_csv(d / "Movie Reviews.csv", good_rows())
    return Expect(d / "Movie Reviews.csv")


@case("folder")
def duplicate_dataset_name(d: Path) -> Expect:
    write_csv(d / f"{BAD}.csv", good_rows())
    write_parquet(d / f"{BAD}.parquet", good_rows())
    return Expect(d / f"{BAD}.parquet")


@case("folder")
def uppercase_suffix(d: Path) -> Expect:
    write_csv(d / f"{BAD}.CSV", good_rows())
    return Expect(d / f"{BAD}.CSV")


@case("folder")
def symlink_to_outside_csv(d: Path) -> Expect:
    outside = d.parent / f"{d.name}-outside.csv"
    write_csv(outside, good_rows())
    (d / f"{BAD}.csv").symlink_to(outside)
    return Expect(d / f"{BAD}.csv")


@case("folder")
def symlink_to_system_file(d: Path) -> Expect:
    (d / f"{BAD}.csv").symlink_to("/etc/passwd")
    return Expect(d / f"{BAD}.csv")


@case("folder")
def symlink_to_non_csv_inside(d: Path) -> Expect:
    write_parquet(d / "data.bin", good_rows())
    (d / f"{BAD}.csv").symlink_to(d / "data.bin")
    return Expect(d / f"{BAD}.csv")


@case("folder")
def symlink_relative_escape(d: Path) -> Expect:
    outside = d.parent / f"{d.name}-rel.csv"
    write_csv(outside, good_rows())
    (d / f"{BAD}.csv").symlink_to(Path("..") / outside.name)
    return Expect(d / f"{BAD}.csv")


@case("folder")
def broken_symlink(d: Path) -> Expect:
    (d / f"{BAD}.csv").symlink_to(d / "gone.csv")
    return Expect(d / f"{BAD}.csv")


@case("folder")
def symlink_loop(d: Path) -> Expect:
    (d / f"{BAD}.csv").symlink_to(d / "loop.txt")
    (d / "loop.txt").symlink_to(d / f"{BAD}.csv")
    return Expect(d / f"{BAD}.csv")


@case("folder")
def folder_named_csv(d: Path) -> Expect:
    (d / f"{BAD}.csv").mkdir()
    return Expect(d / f"{BAD}.csv")


@case("folder")
def fifo_named_csv(d: Path) -> Expect:
    os.mkfifo(d / f"{BAD}.csv")  # opening it would block forever
    return Expect(d / f"{BAD}.csv")


# --- CSV structure

@case("csv")
def ragged_row_extra_field(d: Path) -> Expect:
    p = write_csv(d / f"{BAD}.csv", good_rows())
    lines = p.read_text().splitlines(keepends=True)
    lines[4] = lines[4].rstrip("\r\n") + ",extra\r\n"  # data row 4
    p.write_text("".join(lines))
    return Expect(p, row=4)


@case("csv")
def ragged_first_row_extra_field(d: Path) -> Expect:
    p = d / f"{BAD}.csv"
    p.write_text("text,label\nA fine film,with a comma,positive\n" + "".join(f'"{t}",{lab}\n' for t, lab in REVIEWS))
    return Expect(p, row=1)


@case("csv")
def ragged_row_missing_field(d: Path) -> Expect:
    p = write_csv(d / f"{BAD}.csv", good_rows())
    lines = p.read_text().splitlines(keepends=True)
    lines[7] = '"A film with no label at all"\r\n'
    p.write_text("".join(lines))
    return Expect(p, row=7)


@case("csv")
def unclosed_quote(d: Path) -> Expect:
    p = write_csv(d / f"{BAD}.csv", good_rows())
    lines = p.read_text().splitlines(keepends=True)
    lines[10] = '"An unfinished thought,positive\r\n'
    p.write_text("".join(lines))
    return Expect(p, row=10)


@case("csv")
def stray_quote(d: Path) -> Expect:
    p = write_csv(d / f"{BAD}.csv", good_rows())
    lines = p.read_text().splitlines(keepends=True)
    lines[2] = '"Half "quoted" text,negative\r\n'
    p.write_text("".join(lines))
    return Expect(p, row=2)


@case("csv")
def duplicate_header_column(d: Path) -> Expect:
    p = d / f"{BAD}.csv"
    p.write_text("text,label,label\n" + "".join(f'"{t}",{lab},{lab}\n' for t, lab in REVIEWS))
    return Expect(p)


@case("csv")
def missing_label_column(d: Path) -> Expect:
    write_csv(d / f"{BAD}.csv", [{"text": t, "sentiment": lab} for t, lab in REVIEWS])
    return Expect(d / f"{BAD}.csv")


@case("csv")
def missing_text_column(d: Path) -> Expect:
    write_csv(d / f"{BAD}.csv", [{"review": t, "label": lab} for t, lab in REVIEWS])
    return Expect(d / f"{BAD}.csv")


@case("csv")
def no_header_row(d: Path) -> Expect:
    p = d / f"{BAD}.csv"
    p.write_text("".join(f'"{t}",{lab}\n' for t, lab in REVIEWS))
    return Expect(p)


# --- JSONL structure

@case("jsonl")
def jsonl_invalid_line(d: Path) -> Expect:
    p = write_jsonl(d / f"{BAD}.jsonl", good_rows())
    lines = p.read_text().splitlines(keepends=True)
    lines[5] = '{"text": "Unquoted, label: positive}\n'
    p.write_text("".join(lines))
    return Expect(p, row=6)


@case("jsonl")
def jsonl_array_line(d: Path) -> Expect:
    p = write_jsonl(d / f"{BAD}.jsonl", good_rows())
    lines = p.read_text().splitlines(keepends=True)
    lines[2] = '["A list, not an object", "positive"]\n'
    p.write_text("".join(lines))
    return Expect(p, row=3)


@case("jsonl")
def jsonl_text_is_object(d: Path) -> Expect:
    return Expect(write_jsonl(d / f"{BAD}.jsonl", with_row(8, text={"title": "Nested", "body": "review"})), row=8)


@case("jsonl")
def jsonl_label_is_list(d: Path) -> Expect:
    return Expect(write_jsonl(d / f"{BAD}.jsonl", with_row(9, label=["positive", "negative"])), row=9)


@case("jsonl")
def jsonl_deep_nesting(d: Path) -> Expect:
    p = write_jsonl(d / f"{BAD}.jsonl", good_rows())
    p.write_text(p.read_text() + '{"text": ' + "[" * 100_000 + "]" * 100_000 + ', "label": "positive"}\n')
    return Expect(p, row=len(REVIEWS) + 1)


@case("jsonl")
def jsonl_nul_escape(d: Path) -> Expect:
    return Expect(write_jsonl(d / f"{BAD}.jsonl", with_row(11, text="A fine\u0000film")), row=11)


# --- rows: empty, missing-looking and oversized values

@case("row")
def empty_text(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(6, text="   ")), row=6)


@case("row")
def empty_label(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(7, label="")), row=7)


@case("row")
def label_nan_string(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(12, label="NaN")), row=12)


@case("row")
def label_nan_lower(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(13, label="nan")), row=13)


@case("row")
def label_none_string(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(14, label="None")), row=14)


@case("row")
def label_null_string(d: Path) -> Expect:
    return Expect(write_jsonl(d / f"{BAD}.jsonl", with_row(15, label="null")), row=15)


@case("row")
def label_na_string(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(16, label="NA")), row=16)


@case("row")
def label_json_null(d: Path) -> Expect:
    return Expect(write_jsonl(d / f"{BAD}.jsonl", with_row(17, label=None)), row=17)


@case("row")
def label_parquet_null(d: Path) -> Expect:
    return Expect(write_parquet(d / f"{BAD}.parquet", with_row(18, label=None)), row=18)


@case("row")
def label_float_nan_parquet(d: Path) -> Expect:
    rows = [{"text": r["text"], "label": float(r["label"] == "positive")} for r in good_rows()]
    rows[19]["label"] = float("nan")
    write_parquet(d / f"{BAD}.parquet", rows)
    (d / "datasets.yaml").write_text(CONFIG.replace("{positive: ' positive', negative: ' negative'}\n  movies",
                                                    "{1: ' positive', 0: ' negative'}\n  movies"))
    return Expect(d / f"{BAD}.parquet", row=20)


@case("row")
def nul_byte_in_csv_text(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(3, text="A fine\x00film")), row=3)


@case("row")
def nul_byte_in_parquet_text(d: Path) -> Expect:
    return Expect(write_parquet(d / f"{BAD}.parquet", with_row(4, text="A fine\x00film")), row=4)


@case("row")
def nul_byte_in_label(d: Path) -> Expect:
    return Expect(write_parquet(d / f"{BAD}.parquet", with_row(5, label="positive\x00")), row=5)


@case("row")
def invalid_utf8_bytes_in_parquet(d: Path) -> Expect:
    rows = [{"text": r["text"].encode(), "label": r["label"]} for r in good_rows()]
    rows[8]["text"] = b"caf\xe9 au lait"
    write_parquet(d / f"{BAD}.parquet", rows)
    return Expect(d / f"{BAD}.parquet", row=9)


@case("row")
def list_column_in_parquet(d: Path) -> Expect:
    rows = [{"text": [r["text"]], "label": r["label"]} for r in good_rows()]
    return Expect(write_parquet(d / f"{BAD}.parquet", rows), row=1)


@case("row")
def text_over_limit_csv(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(2, text="very " * 30_000)), row=2)


@case("row")
def text_20mb_jsonl(d: Path) -> Expect:
    return Expect(write_jsonl(d / f"{BAD}.jsonl", with_row(21, text="word " * 4_000_000)), row=21)


@case("row")
def text_20mb_csv(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(21, text="word " * 4_000_000)), row=21)


@case("row")
def multibyte_text_over_limit(d: Path) -> Expect:
    return Expect(write_parquet(d / f"{BAD}.parquet", with_row(10, text="映画" * 20_000)), row=10)


@case("row")
def text_pair_over_limit(d: Path) -> Expect:
    rows = [{**r, "text_pair": "short"} for r in good_rows()]
    rows[11]["text_pair"] = "long " * 30_000
    return Expect(write_parquet(d / f"{BAD}.parquet", rows), row=12)


@case("row")
def label_too_long(d: Path) -> Expect:
    return Expect(write_parquet(d / f"{BAD}.parquet", with_row(1, label="positive " * 200)), row=1)


# --- the dataset as a whole: classes and splits

@case("dataset")
def one_class_only(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", [{"text": t, "label": "positive"} for t, _ in REVIEWS]))


@case("dataset")
def too_many_classes(d: Path) -> Expect:
    rows = [{"text": f"{t} ({i})", "label": f"class_{i}"} for i, (t, _) in enumerate(REVIEWS * 6)]
    write_csv(d / f"{BAD}.csv", rows)
    (d / "datasets.yaml").write_text(CONFIG.split("  reviews:")[0] + CONFIG.split("' negative'}\n", 1)[1])
    return Expect(d / f"{BAD}.csv")


@case("dataset")
def label_not_in_label_words(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", with_row(22, label="neutral")), row=22)


@case("dataset")
def unknown_split_value(d: Path) -> Expect:
    rows = [{**r, "split": ["train", "validation", "test"][i % 3]} for i, r in enumerate(good_rows())]
    rows[13]["split"] = "holdout"
    return Expect(write_csv(d / f"{BAD}.csv", rows), row=14)


@case("dataset")
def train_split_lacks_a_class(d: Path) -> Expect:
    negatives = iter(["validation", "test"] * len(REVIEWS))
    rows = [{**r, "split": "train" if r["label"] == "positive" else next(negatives)} for r in good_rows()]
    return Expect(write_csv(d / f"{BAD}.csv", rows))


@case("dataset")
def one_training_row(d: Path) -> Expect:
    rows = [{**r, "split": "validation" if i else "train"} for i, r in enumerate(good_rows())]
    return Expect(write_csv(d / f"{BAD}.csv", rows))


@case("dataset")
def no_validation_rows(d: Path) -> Expect:
    rows = [{**r, "split": "train" if i % 2 else "test"} for i, r in enumerate(good_rows())]
    return Expect(write_csv(d / f"{BAD}.csv", rows))


@case("dataset")
def two_rows_only(d: Path) -> Expect:
    return Expect(write_csv(d / f"{BAD}.csv", good_rows()[:2]))


@case("dataset")
def template_needs_missing_text_pair(d: Path) -> Expect:
    write_csv(d / f"{BAD}.csv", good_rows())
    (d / "datasets.yaml").write_text(CONFIG.replace("task_type: sentiment\n    label_words: {positive: ' positive', "
                                                    "negative: ' negative'}\n  movies",
                                                    "template: 'A: {text} B: {text_pair} Answer:'\n  movies", 1))
    return Expect(d / f"{BAD}.csv", row=1)


@case("dataset")
def label_words_share_first_token(d: Path) -> Expect:
    write_csv(d / f"{BAD}.csv", good_rows())
    (d / "datasets.yaml").write_text(CONFIG.replace("{positive: ' positive', negative: ' negative'}\n  movies",
                                                    "{positive: ' good', negative: ' good grief'}\n  movies"))
    return Expect(d / f"{BAD}.csv")


# --- the settings YAML

def bad_config(d: Path, text: str | bytes) -> Expect:
    write_csv(d / f"{BAD}.csv", good_rows())
    p = d / "datasets.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return Expect(p)


@case("config")
def yaml_syntax_error(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    label_words: {positive: ' positive'\n")


@case("config")
def yaml_tab_indentation(d: Path) -> Expect:
    return bad_config(d, "datasets:\n\treviews:\n\t\ttask_type: sentiment\n")


@case("config")
def yaml_top_level_list(d: Path) -> Expect:
    return bad_config(d, "- reviews\n- movies\n")


@case("config")
def yaml_datasets_is_list(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  - reviews\n  - movies\n")


@case("config")
def yaml_unknown_setting(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    labels: [positive, negative]\n")


@case("config")
def yaml_undecodable(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    task_type: sentiment \xe9\n".encode("latin-1"))


@case("config")
def yaml_bad_dataset_name(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  Movie Reviews:\n    task_type: sentiment\n")


@case("config")
def split_fractions_not_summing_to_one(d: Path) -> Expect:
    return bad_config(d, "defaults:\n  split_fractions: [0.5, 0.2, 0.2]\n")


@case("config")
def split_fractions_strings(d: Path) -> Expect:
    return bad_config(d, "defaults:\n  split_fractions: [sixty, twenty, twenty]\n")


@case("config")
def split_fractions_two_numbers(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    split_fractions: [0.8, 0.2]\n")


@case("config")
def split_fractions_negative(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    split_fractions: [1.2, -0.1, -0.1]\n")


@case("config")
def split_fractions_no_validation(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    split_fractions: [0.8, 0.0, 0.2]\n")


@case("config")
def split_fractions_scalar(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    split_fractions: 0.6\n")


@case("config")
def template_without_text(d: Path) -> Expect:
    return bad_config(d, "defaults:\n  template: 'Review. Answer:'\n")


@case("config")
def template_unbalanced_brace(d: Path) -> Expect:
    return bad_config(d, "defaults:\n  template: 'Review: {text\\nAnswer:'\n")


@case("config")
def template_unknown_placeholder(d: Path) -> Expect:
    return bad_config(d, "defaults:\n  template: '{title}: {text}\\nAnswer:'\n")


@case("config")
def template_not_a_string(d: Path) -> Expect:
    return bad_config(d, "defaults:\n  template: [a, b]\n")


@case("config")
def label_words_is_list(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    label_words: [positive, negative]\n")


@case("config")
def label_word_empty(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    label_words: {positive: ' positive', negative: ''}\n")


@case("config")
def label_words_null_key(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    label_words: {~: ' positive', negative: ' negative'}\n")


@case("config")
def task_type_not_a_string(d: Path) -> Expect:
    return bad_config(d, "datasets:\n  reviews:\n    task_type: {kind: sentiment}\n")


@case("config")
def config_is_a_folder(d: Path) -> Expect:
    write_csv(d / f"{BAD}.csv", good_rows())
    (d / "datasets.yaml").unlink()
    (d / "datasets.yaml").mkdir()
    return Expect(d / "datasets.yaml")


# ------------------------------------------------------------------------------------------- the probe


def validate_folder(folder: Path, first_token: Callable[[str], int] | None) -> dict[str, int]:
    """What `grouplora run` and the `dataset` asset do with a folder before writing anything: list it
    (DatasetSourceResource.files), read the settings (.config), hash each file (.version), then load_dataset
    with the tokenizer check. Returns rows per dataset."""
    from grouplora.ml.data_format import discover, load_dataset, load_suite_config
    from grouplora.ml.hashing import sha256_file

    files = discover(folder)
    suite = load_suite_config(folder / "datasets.yaml")
    out = {}
    for name, path in files.items():
        sha256_file(path)
        config = suite.for_dataset(name)
        out[name] = len(load_dataset(path, config, seed=0, first_token=first_token))
    return out


def neighbour_survives(folder: Path, first_token: Callable[[str], int] | None) -> bool:
    """Whether the good neighbour still loads when only unusable files are set aside (`scan`, what phase 2's CLI
    uses so that one bad file fails only its own partition)."""
    from grouplora.ml.data_format import DatasetError, load_dataset, load_suite_config, scan

    try:
        files, _ = scan(folder)
        suite = load_suite_config(folder / "datasets.yaml")
        return "movies" in files and len(load_dataset(files["movies"], suite.for_dataset("movies"),
                                                      first_token=first_token)) == len(NEIGHBOUR)
    except DatasetError:
        return False


class CaseTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    """Interrupt a case that hangs (a blocking open, a runaway parse): SIGALRM reaches the main thread."""
    def on_alarm(*_):
        raise CaseTimeout(f"no answer after {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def classify(expect: Expect, error: BaseException | None) -> str:
    from grouplora.ml.data_format import DatasetError

    if expect.file is None:
        return "accepted" if error is None else "rejected_wrongly"
    if error is None:
        return "accepted_wrongly"
    if not isinstance(error, DatasetError):
        return "unclear"
    msg = str(error)
    named = str(expect.file) in msg and "\n" not in msg
    row_ok = expect.row is None or error.row == expect.row
    return "clear" if named and row_ok else "unclear"


def first_token_fn(tokenizer: str) -> Callable[[str], int] | None:
    if tokenizer == "none":
        return None
    from grouplora.ml.model import label_token_ids, load_base_model

    tok = load_base_model(tokenizer)[1]
    return lambda word: label_token_ids(tok, [word])[0]


def run_bad_inputs(args: argparse.Namespace) -> dict[str, Any]:
    first_token = first_token_fn(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="reliability-bad-inputs-"))
    rows = []
    for name, group, build in CASES:
        if args.cases and name not in args.cases:
            continue
        folder = work / name
        base_folder(folder)
        expect = build(folder)
        error: BaseException | None = None
        start = time.perf_counter()
        try:
            with time_limit(args.case_timeout):
                validate_folder(folder, first_token)
        except (Exception, CaseTimeout) as e:  # classifying every outcome is the point of the probe
            error = e
        seconds = time.perf_counter() - start
        outcome = classify(expect, error)
        row = {"case": name, "group": group, "outcome": outcome, "seconds": round(seconds, 3),
               "error": None if error is None else (str(error) if outcome in ("clear", "rejected_wrongly")
                                                    else f"{type(error).__name__}: {error}")[:400]}
        if group not in ("control", "config"):
            row["neighbour_survives"] = neighbour_survives(folder, first_token)
        rows.append(row)
        if args.verbose or outcome not in ("clear", "accepted"):
            print(f"  {outcome:<17} {name:<40} {row['error'] or ''}"[:220].replace(str(work) + "/", ""), flush=True)
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    bad = [r for r in rows if r["group"] != "control"]
    controls = [r for r in rows if r["group"] == "control"]
    count = lambda rs, o: sum(r["outcome"] == o for r in rs)  # noqa: E731
    isolated = [r for r in bad if "neighbour_survives" in r]
    return {
        "keys": {"bad_inputs_tried": len(bad),
                 "bad_inputs_unclear": count(bad, "unclear") + count(bad, "accepted_wrongly")},
        "details": {"clear": count(bad, "clear"), "unclear": count(bad, "unclear"),
                    "accepted_wrongly": count(bad, "accepted_wrongly"),
                    "controls_tried": len(controls), "controls_rejected": count(controls, "rejected_wrongly"),
                    "neighbour_survives": f"{sum(r['neighbour_survives'] for r in isolated)}/{len(isolated)}",
                    "slowest_case": max(rows, key=lambda r: r["seconds"])["case"] if rows else None,
                    "slowest_seconds": max((r["seconds"] for r in rows), default=0.0),
                    "tokenizer": args.tokenizer, "cases": rows},
    }


# ------------------------------------------------------------------------------- through the command line (phase 2)
#
# The sections below drive the real `grouplora` command on real homes (tiny model, the small datasets below), as an
# operator would: kill it, start it twice, feed it bad files, register challengers; then read the homes' own
# records (Dagster runs and materializations, the MLflow store, the stored artifacts) to judge the outcome.

GROUPLORA = Path(sys.executable).parent / "grouplora"
TICKETS = [
    ("I was charged twice for the same order this month.", "billing"),
    ("My parcel has been stuck in transit for a week.", "delivery"),
    ("Please refund the extra fee on my last invoice.", "billing"),
    ("The courier left the box at the wrong address.", "delivery"),
    ("Why does my statement show a payment I never made?", "billing"),
    ("Tracking says delivered but nothing arrived.", "delivery"),
    ("My card was declined although the balance is fine.", "billing"),
    ("Can the driver come after six in the evening?", "delivery"),
    ("The discount code was not applied to my bill.", "billing"),
    ("Half of my order arrived, the rest is missing.", "delivery"),
    ("I need a copy of the invoice for my company.", "billing"),
    ("The package came crushed and soaking wet.", "delivery"),
    ("You billed me after I cancelled my subscription.", "billing"),
    ("Is weekend delivery available in my area?", "delivery"),
    ("The price at checkout was higher than advertised.", "billing"),
    ("My order shipped to my old address by mistake.", "delivery"),
]
FACTS = [
    ("Water boils at 100 degrees Celsius at sea level.", "true"),
    ("The sun orbits the earth once a day.", "false"),
    ("Spiders have eight legs.", "true"),
    ("Mount Everest is the lowest point on earth.", "false"),
    ("Paris is the capital of France.", "true"),
    ("Whales are a kind of fish.", "false"),
    ("The moon reflects light from the sun.", "true"),
    ("Ice sinks in liquid water.", "false"),
    ("A year has twelve months.", "true"),
    ("Bats are blind and cannot see at all.", "false"),
    ("Humans need oxygen to live.", "true"),
    ("Lightning never strikes the same place twice.", "false"),
    ("Sound travels faster in water than in air.", "true"),
    ("Goldfish remember things for only three seconds.", "false"),
    ("The Pacific is the largest ocean.", "true"),
    ("Glass is a slow-flowing liquid at room temperature.", "false"),
]
GOOD = ("movies", "tickets", "facts")  # the datasets every CLI case runs beside
PIPELINE_CONFIG = CONFIG + ("  tickets:\n    task_type: intent\n    label_words: {billing: ' billing', delivery: ' delivery'}\n"
                            "  facts:\n    task_type: fact_check\n    label_words: {'true': ' true', 'false': ' false'}\n")
ACTIVE = ("NOT_STARTED", "STARTING", "STARTED", "CANCELING")


def good_datasets(folder: Path, reviews: bool = True) -> Path:
    """The pipeline's folder: movies, tickets (CSV), facts (JSONL) and, unless told otherwise, reviews."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "movies.csv", rows_of(NEIGHBOUR))
    write_csv(folder / "tickets.csv", rows_of(TICKETS))
    write_jsonl(folder / "facts.jsonl", rows_of(FACTS))
    if reviews:
        write_csv(folder / f"{BAD}.csv", good_rows())
    (folder / "datasets.yaml").write_text(PIPELINE_CONFIG)
    return folder


def touch_dataset(folder: Path, k: int) -> str:
    """A new version of one dataset (k-th change): one more row, so the next run has real work at every stage."""
    name = ["reviews", "tickets", "facts", "movies"][k % 4]
    text = f"An unexpected new example number {k}."
    if name == "facts":
        with open(folder / "facts.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"text": text, "label": "true"}) + "\n")
    else:
        label = {"reviews": "positive", "movies": "negative", "tickets": "billing"}[name]
        with open(folder / f"{name}.csv", "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([text, label])
    return name


def cli_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "GROUPLORA_HOME": str(home), "GROUPLORA_BASE_MODEL": "tiny", "PYTHONUNBUFFERED": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", "GROUPLORA_LOCK_TIMEOUT": "3600"}
    for k in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "GROUPLORA_DEBUG", "GROUPLORA_DATASETS"):
        env.pop(k, None)
    return env


class Cli:
    """One `grouplora` process, its stdout and stderr read together, line by line, as they come."""

    def __init__(self, home: Path, *args: str):
        self.proc = subprocess.Popen([str(GROUPLORA), *args], env=cli_env(home), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.extend(line.replace("\r", "\n").splitlines())

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """Until a line matches (True) or the process ends or time runs out (False)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                if rx.search(self.lines[seen]):
                    return True
                seen += 1
            if self.proc.poll() is not None and not self.reader.is_alive():
                return False
            time.sleep(0.05)
        return False

    def kill(self) -> bool:
        """kill -9 the command (not its children: an operator kills the pid they see); True if it was running."""
        running = self.proc.poll() is None
        if running:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.finish(60)
        return running

    def finish(self, timeout: float = 1800) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(30)
        return self.proc.returncode, "\n".join(self.lines)


def run_cli(home: Path, *args: str, timeout: float = 1800) -> tuple[int, str]:
    return Cli(home, *args).finish(timeout)


def tracking_uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"


@contextmanager
def dagster_instance(home: Path):
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster_home")) as instance:
        yield instance


def leftovers(home: Path) -> dict[str, int]:
    """What a dead process may leave: Dagster runs not finished, MLflow runs RUNNING, logged models PENDING, model
    versions half-registered and not set aside. Read while no grouplora process uses the home."""
    import dagster as dg
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    from grouplora.orchestration.recovery import orphaned_versions

    out = {"dagster_runs": 0, "mlflow_runs": 0, "logged_models": 0, "half_versions": 0}
    if (home / "dagster_home" / "history" / "runs.db").exists():
        with dagster_instance(home) as instance:
            out["dagster_runs"] = len(instance.get_runs(
                filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus[s] for s in ACTIVE])))
    if (home / "mlflow" / "mlflow.db").exists():
        client = MlflowClient(tracking_uri=tracking_uri(home), registry_uri=tracking_uri(home))
        exps = [e.experiment_id for e in client.search_experiments()]
        if exps:
            out["mlflow_runs"] = len(client.search_runs(exps, "attributes.status = 'RUNNING'", max_results=1000))
            out["logged_models"] = sum(m.status == LoggedModelStatus.PENDING
                                       for m in client.search_logged_models(exps, max_results=1000))
        out["half_versions"] = len(orphaned_versions(client))
    return out


def consistency(home: Path, folder: Path) -> list[str]:
    """Problems with a home after a run that should have finished everything (empty: consistent). Every dataset
    partition current at its file's version, the suite and the ensemble current, each adapter's weights readable,
    the results, ensemble and warehouse covering exactly the folder's datasets, the registry's newest version
    complete (tags, challenger alias, the promotion decision) and holding the ensemble's validation accuracy."""
    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    from grouplora.ml.ensemble import Ensemble
    from grouplora.orchestration import freshness
    from grouplora.orchestration.jobs import PER_DATASET_ASSETS
    from grouplora.orchestration.registry import PROMOTION_TAG
    from grouplora.orchestration.resources import DatasetSourceResource, settings_run_config

    problems: list[str] = []
    sources = DatasetSourceResource(folder=str(folder))
    versions = {n: sources.version(n) for n in sources.files()}
    storage = home / "storage"
    try:
        spec = json.loads((storage / "partition" / "task_partition.json").read_text())
        keys = [g["key"] for g in spec["groups"]] + [spec["baseline"]["key"]]
    except (OSError, KeyError, ValueError) as e:
        return [f"no readable task partition: {e}"]
    with dagster_instance(home) as instance:
        problems += [f"{n}: partition not current" for n, v in versions.items()
                     if not freshness.partition_is_current(instance, n, v, PER_DATASET_ASSETS)]
        config = settings_run_config()  # the defaults, as the CLI runs used them
        if not freshness.suite_is_current(instance, versions, spec, PER_DATASET_ASSETS, config):
            problems.append("suite not current")
        if not freshness.ensemble_is_current(instance, keys, config):
            problems.append("ensemble not current")
    for key in keys:
        try:
            with safe_open(str(storage / "adapters" / key / "adapter_model.safetensors"), "pt") as f:
                [f.get_tensor(k) for k in f.keys()]
        except Exception as e:  # any way of being unreadable is the finding
            problems.append(f"adapter {key}: {type(e).__name__}: {e}")
    try:
        results = pd.read_parquet(storage / "ensemble" / "results.parquet")
        if sorted(results["dataset"]) != sorted(versions):
            problems.append(f"results cover {sorted(results['dataset'])}, not {sorted(versions)}")
        ens = Ensemble.load(storage / "ensemble" / "current" / "ensemble.json")
        if sorted(ens.weights) != sorted(versions):
            problems.append("ensemble weights cover other datasets")
        info = json.loads((storage / "ensemble" / "current.json").read_text())
    except Exception as e:
        return problems + [f"ensemble artifacts: {type(e).__name__}: {e}"]
    import duckdb

    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT count(*) FROM accuracy_report").fetchone()[0]
        con.execute("SELECT count(*) FROM gradient_features").fetchone()
    if rows != len(versions) + 1:
        problems.append(f"accuracy_report has {rows} rows")
    client = MlflowClient(tracking_uri=tracking_uri(home), registry_uri=tracking_uri(home))
    newest = max(client.search_model_versions("name = 'grouplora-ensemble'"), key=lambda mv: int(mv.version))
    missing = [t for t in ("val_accuracy", "base_model", PROMOTION_TAG) if t not in newest.tags]
    if missing:
        problems.append(f"newest version v{newest.version} lacks {missing}")
    elif abs(float(newest.tags["val_accuracy"]) - info["val_accuracy"]) > 1e-9:
        problems.append(f"newest version v{newest.version} is not the current ensemble")
    challenger = client.get_model_version_by_alias("grouplora-ensemble", "challenger")
    if str(challenger.version) != str(newest.version):
        problems.append(f"challenger is v{challenger.version}, not the newest version v{newest.version}")
    return problems


# A kill at each stage of a run: (stage, what to wait for, seconds after it). "@init" waits for the home's init lock
# file: the first initialization of a new home's stores (their schema migrations) is under way.
KILL_STAGES = [
    ("first initialization of a new home", "@init", 1.0),
    ("validating the folder", r"^== \d+ datasets in", 0.0),
    ("dataset step", r" - dataset - .* rows from ", 0.0),
    ("features pass at θ0", r" - theta0_pass - .* examples, d=", 0.0),
    ("zero-shot scores of the same pass", r" - theta0_pass - .* zero-shot accuracy", 0.0),
    ("approximation error", r"^== suite-wide assets: approximation", 1.0),
    ("subset estimates", r" - subset_estimates - .* subsets of ", 0.0),
    ("task partition", r" - task_partition - ", 0.0),
    ("adapter training, between epochs", r" - adapter - adapter .*: epoch 1 loss", 0.0),
    ("ensemble fit", r" - ensemble - .*: zero_shot ", 0.0),
    ("model registration", r"^Created version", 0.0),
    ("after registration, before promotion", r" - registered_ensemble - registered ", 0.0),
    ("promotion", r" - champion - (promoted|not promoted)", 0.0),
]


def run_kill(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="reliability-kill-"))
    folder = good_datasets(work / "datasets")
    home = work / "home"
    stages = KILL_STAGES[: args.kill_trials] if args.kill_trials else KILL_STAGES
    rows = []
    for k, (stage, pattern, delay) in enumerate(stages):
        changed = touch_dataset(folder, k) if k else None  # after the first trial the home is a used one
        start = time.perf_counter()
        cli = Cli(home, "run", "--datasets", str(folder))
        if pattern == "@init":
            hit = wait_path(home / ".init.lock", cli, 900)
        else:
            hit = cli.wait_for(pattern, 900)
        time.sleep(delay)
        killed = cli.kill()
        left = leftovers(home)
        rc, out = run_cli(home, "run", "--datasets", str(folder))
        after = leftovers(home)
        problems = consistency(home, folder) if rc == 0 else [f"rerun exit {rc}: {tail(out)}"]
        row = {"stage": stage, "changed": changed, "killed_mid_run": killed and hit, "left_by_kill": left,
               "rerun_exit": rc, "rerun_recovered": "recovered after a crash" in out, "left_after_rerun": after,
               "consistent": not problems, "problems": problems[:5], "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(f"  kill at {stage}: {'killed' if row['killed_mid_run'] else 'NOT KILLED MID-RUN'}; left {left}; "
              f"rerun exit {rc}, {'consistent' if not problems else problems[:2]}; after {after}", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    trials = [r for r in rows if r["killed_mid_run"]]
    return {"keys": {"kill_trials": len(trials), "kill_consistent": sum(r["consistent"] for r in trials),
                     "stale_runs_left": sum(sum(r["left_after_rerun"].values()) for r in rows)},
            "details": {"attempted": len(rows), "missed_stage": [r["stage"] for r in rows if not r["killed_mid_run"]],
                        "kills_that_left_something": sum(any(r["left_by_kill"].values()) for r in trials),
                        "trials": rows}}


def wait_path(path: Path, cli: Cli, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cli.proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.02)
    return False


def tail(text: str, n: int = 3) -> list[str]:
    return [line[:300] for line in text.strip().splitlines()[-n:]]


def duplicated_work(home: Path) -> int:
    """Materializations that repeat one already made: a dataset partition at a data version it had, an adapter key
    trained again. With runs on one home serialized, a waiting run finds the work done and repeats none."""
    import dagster as dg

    with dagster_instance(home) as instance:
        seen: dict[tuple, int] = {}
        for asset in ("dataset", "adapter"):
            for r in instance.fetch_materializations(dg.AssetKey(asset), limit=10_000).records:
                m = r.asset_materialization
                version = (m.tags or {}).get("dagster/data_version") if asset == "dataset" else None
                seen[(asset, m.partition, version)] = seen.get((asset, m.partition, version), 0) + 1
    return sum(n - 1 for n in seen.values())


CONCURRENCY_TRIALS = [  # (home, runs started together, seconds between starts)
    ("new", 3, 0.0), ("new", 2, 5.0), ("used", 3, 0.0), ("used", 2, 2.0)]


def run_concurrency(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="reliability-concurrency-"))
    rows, homes, k = [], [], 0
    for i, (kind, n, stagger) in enumerate(CONCURRENCY_TRIALS):
        if kind == "new":
            home, folder = work / f"home{i}", good_datasets(work / f"datasets{i}")
            homes.append((home, folder))
        else:
            home, folder = homes[(i - 2) % len(homes)]
            touch_dataset(folder, k := k + 1)
        start = time.perf_counter()
        clis = []
        for j in range(n):
            if j:
                time.sleep(stagger)
            clis.append(Cli(home, "run", "--datasets", str(folder)))
        outs = [c.finish() for c in clis]
        left = leftovers(home)
        problems = consistency(home, folder)
        failed = [tail(out) for rc, out in outs if rc != 0]
        row = {"home": kind, "runs": n, "stagger_s": stagger, "exits": [rc for rc, _ in outs],
               "waited": sum("another grouplora run is using" in out for _, out in outs), "failed_runs": failed,
               "left": left, "consistent": not problems, "problems": problems[:5],
               "duplicated_work": duplicated_work(home), "seconds": round(time.perf_counter() - start, 1)}
        row["broken"] = bool(failed or problems or any(left.values()))
        rows.append(row)
        print(f"  {n} runs on a {kind} home (stagger {stagger}s): exits {row['exits']}, {row['waited']} waited, "
              f"{'consistent' if not problems else problems[:2]}, duplicated work {row['duplicated_work']}", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"keys": {"concurrent_runs": sum(r["runs"] for r in rows),
                     "concurrent_broken_homes": sum(r["broken"] for r in rows)},
            "details": {"failed_runs": sum(len(r["failed_runs"]) for r in rows),
                        "duplicated_work": sum(r["duplicated_work"] for r in rows), "trials": rows}}


# The bad inputs taken through `grouplora run` (each case is one run of the command: ~20-30 s of start-up on this
# CPU, so a sample of every group, including each failure the issue saw; --cli-cases all takes the whole corpus).
CLI_CASES = [
    "empty_csv", "empty_parquet", "header_only_csv", "latin1_csv", "utf16_csv_with_bom", "random_bytes_named_csv",
    "parquet_truncated", "parquet_data_page_corrupted", "file_over_max_bytes",
    "invalid_file_name", "duplicate_dataset_name", "symlink_to_outside_csv", "symlink_to_non_csv_inside",
    "broken_symlink", "fifo_named_csv",
    "ragged_row_extra_field", "unclosed_quote", "missing_label_column", "jsonl_invalid_line", "jsonl_nul_escape",
    "empty_text", "label_nan_string", "nul_byte_in_csv_text", "text_20mb_jsonl", "label_too_long",
    "one_class_only", "train_split_lacks_a_class", "one_training_row", "label_words_share_first_token",
    "yaml_syntax_error", "split_fractions_not_summing_to_one", "template_unknown_placeholder",
]


def artifact_digests(home: Path, names: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every stored per-dataset artifact of `names` (rows, cards, zero-shot scores, features)."""
    from grouplora.ml.hashing import sha256_file

    storage = home / "storage"
    return {str(p.relative_to(storage)): sha256_file(p) for kind in ("datasets", "zero_shot", "features")
            for p in sorted((storage / kind).glob("*")) if p.stem in names}


def run_cli_bad_inputs(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="reliability-cli-"))
    home = work / "home"
    base = good_datasets(work / "good", reviews=False)
    (base / "datasets.yaml").write_text(CONFIG)
    rc, out = run_cli(home, "run", "--datasets", str(base))
    if rc != 0:
        raise RuntimeError(f"the good datasets alone failed (exit {rc}): {tail(out, 20)}")
    before = artifact_digests(home, GOOD)
    builders = {name: build for name, _, build in CASES}
    names = [c for c, g, _ in CASES if g != "control"] if args.cli_cases == ["all"] else (args.cli_cases or CLI_CASES)
    rows = []
    for name in [*names, "control_csv"]:
        folder = work / "cases" / name
        base_folder(folder)
        write_csv(folder / "tickets.csv", rows_of(TICKETS))
        write_jsonl(folder / "facts.jsonl", rows_of(FACTS))
        expect = builders[name](folder)
        start = time.perf_counter()
        rc, out = run_cli(home, "run", "--datasets", str(folder))
        traceback = "Traceback (most recent call last)" in out or "Stack Trace:" in out
        after = artifact_digests(home, GOOD)
        lost = sorted(k for k in before if after.get(k) != before[k])
        if expect.file is None:  # the control: reviews is fine, so it runs beside the others
            clear = rc == 0
            line = None
        else:
            lines = [ln for ln in out.splitlines() if str(expect.file) in ln
                     and (expect.row is None or f"row {expect.row}" in ln)]
            line = lines[0].strip() if lines else None
            clear = rc == 2 and line is not None
            written = [str(p) for p in (home / "storage").glob(f"*/{BAD}.*")]
            if written:
                lost.append(f"rejected {BAD} wrote {written}")
        rows.append({"case": name, "exit": rc, "clear": clear, "traceback": traceback, "lost": lost, "line": line,
                     "tail": None if clear else tail(out), "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {'clear  ' if clear else 'UNCLEAR'} exit {rc}{' TRACEBACK' if traceback else ''}"
              f"{' LOST ' + str(lost) if lost else ''} {name}: {(line or tail(out, 1)[0])[:150]}", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in rows if r["case"] != "control_csv"]
    return {"keys": {"tracebacks": sum(r["traceback"] for r in rows), "data_lost": sum(bool(r["lost"]) for r in rows)},
            "details": {"cases_tried": len(bad), "clear": sum(r["clear"] for r in bad),
                        "control_ran": rows[-1]["exit"] == 0, "cases": rows}}


PROMOTION_CASES = [  # (registered name, val_accuracy, zero-shot, one adapter on all, should be promoted)
    ("first below zero-shot", "a", 0.55, 0.60, 0.50, False),
    ("first below one adapter on all", "b", 0.55, 0.40, 0.70, False),
    ("first above both baselines (control)", "a", 0.80, 0.50, 0.60, True),
    ("worse than the champion", "a", 0.70, 0.50, 0.60, False),
    ("equal to the champion", "a", 0.80, 0.50, 0.60, False),
    ("beats the champion, below one adapter on all", "a", 0.85, 0.50, 0.90, False),
    ("beats the champion, ties zero-shot", "a", 0.85, 0.85, 0.60, False),
    ("no finite val_accuracy", "a", float("nan"), 0.50, 0.60, False),
    ("beats the champion and both baselines (control)", "a", 0.90, 0.50, 0.60, True),
    ("no baselines recorded, beats the champion (control)", "a", 0.95, None, None, True),
]


def run_promotion(args: argparse.Namespace) -> dict[str, Any]:
    """Real ensembles registered with chosen validation figures, then `grouplora promote`; and the champion a real
    pipeline run chose, against its own baselines."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    from grouplora.orchestration.registry import PROMOTION_TAG, log_ensemble

    work = Path(tempfile.mkdtemp(prefix="reliability-promotion-"))
    home, folder = work / "home", good_datasets(work / "datasets")
    rc, out = run_cli(home, "run", "--datasets", str(folder))
    if rc != 0:
        raise RuntimeError(f"the pipeline run failed (exit {rc}): {tail(out, 20)}")
    client = MlflowClient(tracking_uri=tracking_uri(home), registry_uri=tracking_uri(home))
    rows = []
    pipeline = client.get_model_version_by_alias("grouplora-ensemble", "champion") \
        if "champion" in client.get_registered_model("grouplora-ensemble").aliases else None
    if pipeline is not None:  # whatever the run promoted beats the baselines it recorded
        val = float(pipeline.tags["val_accuracy"])
        ok = all(val > float(pipeline.tags[t]) for t in ("val_zero_shot", "val_one_adapter_all") if t in pipeline.tags)
        rows.append({"case": "the pipeline run's own champion", "expected": ok, "promoted": True,
                     "worse_promoted": not ok, "reason": pipeline.tags.get(PROMOTION_TAG)})
    ensemble_json = home / "storage" / "ensemble" / "current" / "ensemble.json"
    for case, model, val, zero_shot, one_all, expected in PROMOTION_CASES:
        name = f"probe-{model}"
        metrics = {"val_accuracy": val, **({"val_zero_shot": zero_shot} if zero_shot is not None else {}),
                   **({"val_one_adapter_all": one_all} if one_all is not None else {})}
        v = log_ensemble(ensemble_json, registered_name=name, tracking_uri=tracking_uri(home), metrics=metrics).version
        rc, out = run_cli(home, "promote", "--name", name)
        aliases = client.get_registered_model(name).aliases
        promoted = str(aliases.get("champion")) == str(v)
        reason = client.get_model_version(name, v).tags.get(PROMOTION_TAG)
        rows.append({"case": case, "version": v, "expected": expected, "promoted": promoted,
                     "worse_promoted": promoted and not expected, "exit": rc, "said": tail(out, 2), "reason": reason,
                     "reason_shown": reason is not None and reason.split(": ", 1)[-1] in out})
        print(f"  {'promoted' if promoted else 'refused '} ({'ok' if promoted == expected else 'WRONG'}) {case}: "
              f"{reason}", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"keys": {"worse_promoted": sum(r["worse_promoted"] for r in rows)},
            "details": {"cases": len(rows), "as_expected": sum(r["promoted"] == r["expected"] for r in rows),
                        "controls_refused": sum(r["expected"] and not r["promoted"] for r in rows),
                        "reasons_shown": sum(r.get("reason_shown", True) for r in rows), "rows": rows}}


@dataclass(frozen=True)
class Section:
    name: str
    keys: tuple[str, ...]
    run: Callable[[argparse.Namespace], dict[str, Any]] | None  # None: not implemented yet (phase 2)
    about: str


SECTIONS = [
    Section("bad_inputs", ("bad_inputs_tried", "bad_inputs_unclear"), run_bad_inputs,
            "the bad-input corpus through the dataset asset's validation"),
    Section("cli_bad_inputs", ("tracebacks", "data_lost"), run_cli_bad_inputs,
            "the corpus through `grouplora run` beside good datasets: exit status, one line each, artifacts kept"),
    Section("kill", ("kill_trials", "kill_consistent", "stale_runs_left"), run_kill,
            "kill -9 at each stage, rerun, consistency, no STARTED/RUNNING leftovers"),
    Section("concurrency", ("concurrent_runs", "concurrent_broken_homes"), run_concurrency,
            "concurrent `grouplora run` on new and used homes"),
    Section("promotion", ("worse_promoted",), run_promotion,
            "worse and baseline-losing challengers are not promoted"),
]
KEYS = [k for s in SECTIONS for k in s.keys]


def git_commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() + ("+dirty" if dirty else "")) if r.returncode == 0 else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", choices=[s.name for s in SECTIONS], default=[s.name for s in SECTIONS],
                    help="Sections to run (default all); the others keep their last results in --out.")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--fresh", action="store_true", help="Forget earlier results in --out (unrun sections: null).")
    ap.add_argument("--tokenizer", default="tiny", help="Base model whose tokenizer checks label words: tiny "
                    "(no download), smollm2-135m-instruct, or none.")
    ap.add_argument("--cases", nargs="*", default=None, help="bad_inputs: only these cases (by name).")
    ap.add_argument("--case-timeout", type=int, default=120)
    ap.add_argument("--cli-cases", nargs="*", default=None,
                    help="cli_bad_inputs: these cases (default: a sample of every group; 'all': the whole corpus).")
    ap.add_argument("--kill-trials", type=int, default=0, help="kill: only the first N stages (default: all).")
    ap.add_argument("--keep", action="store_true", help="Keep the case folders (printed) for inspection.")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    old = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {}
    result: dict[str, Any] = {k: old.get(k) for k in KEYS}
    sections: dict[str, Any] = dict(old.get("sections", {}))
    for s in SECTIONS:
        if s.name not in args.sections:
            sections.setdefault(s.name, {"status": "not run", "about": s.about})
            continue
        if s.run is None:
            sections[s.name] = {"status": "not implemented", "about": s.about}
            result.update({k: None for k in s.keys})
            continue
        print(f"== {s.name}: {s.about}", flush=True)
        start = time.perf_counter()
        out = s.run(args)
        result.update(out["keys"])
        sections[s.name] = {"status": "ran", "about": s.about, "commit": git_commit(),
                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "seconds": round(time.perf_counter() - start, 1), **out["details"]}
        print(f"   {', '.join(f'{k}={v}' for k, v in out['keys'].items())}; "
              + ", ".join(f"{k}={v}" for k, v in out["details"].items() if not isinstance(v, (list, dict))), flush=True)
    result["sections"] = sections
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
