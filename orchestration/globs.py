"""File patterns for DuckDB's read_parquet whose folder is taken literally.

DuckDB expands `*`, `?` and `[...]` anywhere in a path, so a GROUPLORA_HOME such as `/data/run[2]` made every
`read_parquet('<home>/storage/datasets/*.parquet')` match nothing. DuckDB has no escape character for globs; a
one-character class does it: `[[]` matches `[`, `[]]` matches `]`, `[*]` and `[?]` match themselves (bash
semantics, which DuckDB's globbing follows). Two characters cannot be made to work, so `check_home` refuses a home
holding them, with a clear error: a backslash (DuckDB reads it as a path separator) and `?` in the database file's
path (DuckDB cuts the path at `?` to name its write-ahead log: "wh?at/w.duckdb" logs to "wh.wal?at/w.duckdb").
"""

from __future__ import annotations

from pathlib import Path

GLOB_CHARS = "[]*?"


def escape_glob(text: str) -> str:
    """`text` with every glob character made literal for DuckDB."""
    return "".join(f"[{c}]" if c in GLOB_CHARS else c for c in text)


def literal_folder_glob(pattern: str) -> str:
    """`pattern` (e.g. "/home/x[1]/storage/datasets/*.parquet") with the folder part escaped and the last
    component (the file pattern) left as it is."""
    if "\\" in pattern:
        raise ValueError(f"{pattern!r}: DuckDB reads '\\' in a path as a separator; use a folder without one "
                         "(GROUPLORA_HOME)")
    folder, sep, name = pattern.rpartition("/")
    return escape_glob(folder) + sep + name


def check_home(home: str | Path) -> Path:
    """`home` (GROUPLORA_HOME) if DuckDB can hold its warehouse and read its Parquet there; else ValueError saying
    which character to remove."""
    text = str(Path(home).resolve())
    bad = [c for c in ("?", "\\") if c in text]
    if bad:
        raise ValueError(f"GROUPLORA_HOME {text!r} contains {' and '.join(repr(c) for c in bad)}, which DuckDB "
                         "cannot use in a path: choose a folder without it")
    return Path(text)
