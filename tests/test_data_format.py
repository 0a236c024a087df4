"""The dataset format: every bad input named in the README gets an error with the file, the row and the problem."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from grouplora.ml.data_format import (DEFAULT_LIMITS, ConfigError, DatasetConfig, DatasetError, InputLimits,
                                      LimitError, discover, load_dataset, load_suite_config, scan, stratified_split,
                                      validate_name)


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def good_rows(n: int = 12) -> list[dict]:
    return [{"text": f"review number {i} {'great' if i % 2 else 'awful'}", "label": "pos" if i % 2 else "neg"}
            for i in range(n)]


def test_csv_roundtrip_makes_canonical_columns_and_a_stratified_split(tmp_path):
    df = load_dataset(write_csv(tmp_path / "reviews.csv", good_rows(30)), DatasetConfig(name="reviews"), seed=3)
    assert list(df.columns) == ["dataset", "example_id", "text", "text_pair", "label", "label_id", "split", "prompt"]
    assert set(df["split"]) == {"train", "validation", "test"}
    for _, g in df.groupby("label"):  # stratified: each class reaches every split
        assert set(g["split"]) == {"train", "validation", "test"}
    assert df["example_id"].is_unique
    assert df["prompt"].iloc[0] == f"{df['text'].iloc[0]}\nAnswer:"
    again = load_dataset(tmp_path / "reviews.csv", DatasetConfig(name="reviews"), seed=3)
    pd.testing.assert_frame_equal(df, again)


def test_jsonl_and_parquet_with_text_pair_and_given_split(tmp_path):
    rows = [{"text": f"premise {i}", "text_pair": f"hypothesis {i}", "label": ["yes", "no"][i % 2],
             "split": ["train", "val", "test"][i % 3]} for i in range(9)]
    (tmp_path / "nli.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pd.DataFrame(rows).to_parquet(tmp_path / "nli2.parquet")
    cfg = DatasetConfig(name="nli", template="P: {text}\nH: {text_pair}\nAnswer:", label_words={"yes": " yes", "no": " no"})
    a = load_dataset(tmp_path / "nli.jsonl", cfg)
    b = load_dataset(tmp_path / "nli2.parquet", cfg)
    assert a["split"].tolist() == ["train", "validation", "test"] * 3
    assert a["prompt"].iloc[0] == "P: premise 0\nH: hypothesis 0\nAnswer:"
    assert a["label_id"].tolist() == b["label_id"].tolist() == [0, 1] * 4 + [0]


@pytest.mark.parametrize("rows, problem, row", [
    ([{"text": "a", "lbl": "x"}], "missing column(s) ['label']", None),
    ([{"text": "ok", "label": "a"}, {"text": "  ", "label": "b"}], "empty text", 2),
    ([{"text": "a", "label": "same"}, {"text": "b", "label": "same"}], "only one class ('same')", None),
    ([{"text": "a", "label": "x", "split": "train"}, {"text": "b", "label": "y", "split": "holdout"}],
     "split 'holdout' is not one of", 2),
])
def test_bad_rows_name_file_row_and_problem(tmp_path, rows, problem, row):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DatasetError) as e:
        load_dataset(path, DatasetConfig(name="bad"))
    assert problem in str(e.value) and str(path) in str(e.value)
    assert e.value.row == row


def test_undecodable_bytes_report_the_row(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\nfine,a\nbad caf\xe9,b\n")
    with pytest.raises(DatasetError, match=r"latin.csv, row 2: undecodable bytes"):
        load_dataset(path, DatasetConfig(name="latin"))


def test_invalid_jsonl_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": broken}\n')
    with pytest.raises(DatasetError, match=r"j.jsonl, row 2: invalid JSON"):
        load_dataset(path, DatasetConfig(name="j"))


def test_label_words_whose_first_tokens_collide(tmp_path):
    path = write_csv(tmp_path / "nli.csv", good_rows())
    cfg = DatasetConfig(name="nli", label_words={"pos": " entailment", "neg": " entailment not"})
    with pytest.raises(DatasetError, match="not distinct|same token"):
        load_dataset(path, cfg, first_token=lambda w: hash(w.split()[0]))
    cfg = DatasetConfig(name="nli", label_words={"pos": " entailment", "neg": " entail"})
    with pytest.raises(DatasetError, match=r"'.*' and '.*' start with the same token"):
        load_dataset(path, cfg, first_token=lambda w: hash(w.strip()[:6]))


def test_label_missing_from_label_words(tmp_path):
    path = write_csv(tmp_path / "s.csv", good_rows() + [{"text": "meh", "label": "neutral"}])
    with pytest.raises(DatasetError, match=r"row 13: label 'neutral' has no entry"):
        load_dataset(path, DatasetConfig(name="s", label_words={"pos": " good", "neg": " bad"}))


def test_unsafe_and_duplicate_names(tmp_path):
    for bad in ["Drop Table", "../x", "1abc", "a;b", "x" * 64, ""]:
        with pytest.raises(ValueError, match="invalid dataset name"):
            validate_name(bad)
    write_csv(tmp_path / "same.csv", good_rows())
    pd.DataFrame(good_rows()).to_parquet(tmp_path / "same.parquet")
    with pytest.raises(DatasetError, match="duplicate dataset name 'same'"):
        discover(tmp_path)
    (tmp_path / "same.parquet").unlink()
    write_csv(tmp_path / "Bad-Name.csv", good_rows())
    with pytest.raises(DatasetError, match="Bad-Name.csv: invalid dataset name"):
        discover(tmp_path)


def test_suite_config_defaults_and_errors(tmp_path):
    cfg = tmp_path / "datasets.yaml"
    cfg.write_text("defaults:\n  template: \"Q: {text}\\nA:\"\ndatasets:\n  spam:\n    task_type: spam\n"
                   "    label_words: {spam: ' spam', ham: ' normal'}\n")
    suite = load_suite_config(cfg)
    spam = suite.for_dataset("spam")
    assert spam.template == "Q: {text}\nA:" and spam.label_words == {"spam": " spam", "ham": " normal"}
    assert suite.for_dataset("other").task_type == "classification"
    cfg.write_text("datasets:\n  qa:\n    label_words: {yes: ' yes', no: ' no', true: ' true', off: ' off'}\n")
    assert list(load_suite_config(cfg).for_dataset("qa").label_words) == ["yes", "no", "true", "off"]
    cfg.write_text("datasets:\n  spam:\n    labels: [a]\n")
    with pytest.raises(DatasetError, match=r"datasets.spam: unknown setting\(s\) \['labels'\]"):
        load_suite_config(cfg)
    cfg.write_text("defaults:\n  template: 'no placeholder'\n")
    with pytest.raises(DatasetError, match="must contain {text}"):
        load_suite_config(cfg)
    cfg.write_text("datasets:\n  Bad Name: {}\n")
    with pytest.raises(ValueError, match="invalid dataset name"):
        load_suite_config(cfg)


def test_stratified_split_is_seeded_and_covers_small_classes():
    labels = pd.Series([0] * 10 + [1] * 3).to_numpy()
    a, b, c = stratified_split(labels, (0.6, 0.2, 0.2), 0), stratified_split(labels, (0.6, 0.2, 0.2), 0), \
        stratified_split(labels, (0.6, 0.2, 0.2), 1)
    assert a == b and a != c
    assert sorted(s for s, y in zip(a, labels) if y == 1) == ["test", "train", "validation"]
    with pytest.raises(ValueError, match="summing to 1"):
        stratified_split(labels, (0.5, 0.2, 0.2), 0)


# ------------------------------------------------------------------ hardening: limits, odd files, odd cells


def test_input_limits_bound_text_label_rows_file_and_classes(tmp_path):
    rows = good_rows(20)
    small = InputLimits(max_text_bytes=40, max_label_bytes=5, max_rows=30, max_file_bytes=1_000, max_classes=3)
    ok = write_csv(tmp_path / "ok.csv", rows)
    assert len(load_dataset(ok, DatasetConfig(name="ok"), limits=small)) == 20
    long_text = write_csv(tmp_path / "t.csv", rows[:4] + [{"text": "é" * 21, "label": "pos"}] + rows[4:])
    with pytest.raises(LimitError, match=r"t.csv, row 5: text: 42 bytes, over the limit of 40"):
        load_dataset(long_text, DatasetConfig(name="t"), limits=small)
    long_label = write_csv(tmp_path / "l.csv", rows[:2] + [{"text": "x", "label": "neutral"}] + rows[2:])
    with pytest.raises(LimitError, match=r"l.csv, row 3: label: 7 bytes"):
        load_dataset(long_label, DatasetConfig(name="l"), limits=small)
    many = write_csv(tmp_path / "m.csv", good_rows(31))
    with pytest.raises(LimitError, match=r"m.csv: more than 30 rows"):
        load_dataset(many, DatasetConfig(name="m"), limits=small)
    pd.DataFrame(good_rows(31)).to_parquet(tmp_path / "mp.parquet")  # Parquet: from the footer, before reading
    with pytest.raises(LimitError, match=r"mp.parquet: 31 rows: over the limit of 30"):
        load_dataset(tmp_path / "mp.parquet", DatasetConfig(name="mp"), limits=replace(small, max_file_bytes=10**6))
    big = write_csv(tmp_path / "b.csv", [{"text": f"review {i} " + "x" * 30, "label": "pos" if i % 2 else "neg"}
                                         for i in range(29)])
    with pytest.raises(LimitError, match=r"b.csv: 1,[0-9]{3} bytes: over the limit of 1,000 bytes per file"):
        load_dataset(big, DatasetConfig(name="b"), limits=small)
    classes = write_csv(tmp_path / "c.csv", [{"text": f"t{i}", "label": "abcd"[i % 4]} for i in range(12)])
    with pytest.raises(LimitError, match=r"c.csv: 4 distinct labels, over the limit of 3"):
        load_dataset(classes, DatasetConfig(name="c"), limits=small)
    with pytest.raises(ValueError, match="max_rows must be a positive integer"):
        InputLimits(max_rows=0)


def test_default_text_limit_rejects_a_20mb_text_quickly(tmp_path):
    import time

    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good_rows(6) + [{"text": "word " * 4_000_000, "label": "pos"}]))
    start = time.perf_counter()
    with pytest.raises(LimitError, match=r"huge.jsonl, row 7: text: 19,999,999 bytes, over the limit of 100,000"):
        load_dataset(path, DatasetConfig(name="huge"))
    assert time.perf_counter() - start < 10
    assert DEFAULT_LIMITS.max_text_bytes == 100_000


@pytest.mark.parametrize("suffix, content, problem", [
    (".csv", b"", "empty file (0 bytes)"),
    (".jsonl", b"", "empty file (0 bytes)"),
    (".parquet", b"", "empty file (0 bytes)"),
    (".csv", b"text,label\n", "no data rows (a header only)"),
    (".csv", b"\n \n", "no header row (the file is blank)"),
    (".jsonl", b"\n\n", "no data rows"),
    (".parquet", b"PAR1" + b"\x00" * 16 + b"PAR1", "cannot read Parquet"),
    (".parquet", b"text,label\na,b\n", "cannot read Parquet"),
])
def test_empty_header_only_and_unreadable_files(tmp_path, suffix, content, problem):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as e:
        load_dataset(path, DatasetConfig(name="bad"))
    assert str(e.value).startswith(f"{path}: ") and problem in str(e.value) and "\n" not in str(e.value)


def test_truncated_parquet_names_the_file(tmp_path):
    path = tmp_path / "cut.parquet"
    pd.DataFrame(good_rows()).to_parquet(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"cut.parquet: cannot read Parquet"):
        load_dataset(path, DatasetConfig(name="cut"))


@pytest.mark.parametrize("body, row, problem", [
    ("text,label\ngood film,pos\ngreat, fun film,pos\n", 2, "3 field(s) where the header has 2 (line 3"),
    ("text,label\nfirst,with,comma,pos\n", 1, "4 field(s) where the header has 2"),
    ("text,label\ngood film,pos\nno label here\n", 2, "1 field(s) where the header has 2"),
    ('text,label\ngood,pos\n"half "quoted",neg\n', 2, "malformed CSV at line 3"),
    ("text,label,label\na,pos,pos\n", None, "duplicate column(s) ['label'] in the header"),
    ("text,label\nok,pos\nbad\x00byte,neg\n", 2, "NUL byte at line 3"),
])
def test_ragged_and_malformed_csv(tmp_path, body, row, problem):
    path = tmp_path / "r.csv"
    path.write_text(body)
    with pytest.raises(DatasetError) as e:
        load_dataset(path, DatasetConfig(name="r"))
    assert problem in str(e.value) and str(path) in str(e.value) and e.value.row == row


@pytest.mark.parametrize("value, problem", [
    ({"a": 1}, "text: expected text, got a dict"),
    (["a"], "text: expected text, got a list"),
    ("nul\u0000inside", "text: NUL byte"),
])
def test_jsonl_cells_must_be_plain_text(tmp_path, value, problem):
    path = tmp_path / "j.jsonl"
    rows = good_rows(6)
    rows[3]["text"] = value
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=rf"j.jsonl, row 4: {re.escape(problem)}"):
        load_dataset(path, DatasetConfig(name="j"))


def test_parquet_cells_nul_bytes_lists_and_undecodable_bytes(tmp_path):
    for i, (text, problem) in enumerate([("a\x00b", "text: NUL byte"), (b"caf\xe9", "text: undecodable bytes"),
                                         (None, "empty text")]):
        rows = good_rows(6)
        rows[2]["text"] = text
        if isinstance(text, bytes):
            rows = [{**r, "text": r["text"].encode() if isinstance(r["text"], str) else r["text"]} for r in rows]
        path = tmp_path / f"p{i}.parquet"
        pd.DataFrame(rows).to_parquet(path)
        with pytest.raises(DatasetError, match=rf"p{i}.parquet, row 3: {problem}"):
            load_dataset(path, DatasetConfig(name=f"p{i}"))
    path = tmp_path / "lists.parquet"
    pd.DataFrame([{"text": [r["text"]], "label": r["label"]} for r in good_rows(6)]).to_parquet(path)
    with pytest.raises(DatasetError, match=r"lists.parquet, row 1: text: expected text"):
        load_dataset(path, DatasetConfig(name="lists"))


@pytest.mark.parametrize("label", ["NaN", "nan", "None", "null", "NA", "n/a", "<NA>"])
def test_nan_like_labels_are_refused_unless_named_in_label_words(tmp_path, label):
    rows = good_rows()
    rows[4]["label"] = label
    path = write_csv(tmp_path / "n.csv", rows)
    with pytest.raises(DatasetError, match=rf"n.csv, row 5: label {re.escape(repr(label))} reads as a missing value"):
        load_dataset(path, DatasetConfig(name="n"))
    rows = [{**r, "label": label if r["label"] == "neg" else "pos"} for r in good_rows()]
    write_csv(path, rows)  # a real class that happens to be spelled like a missing value: name it
    df = load_dataset(path, DatasetConfig(name="n", label_words={"pos": " yes", label: " no"}))
    assert sorted(set(df["label"])) == sorted({"pos", label})


def test_gaps_in_numeric_label_columns(tmp_path):
    rows = [{"text": f"t{i}", "label": float(i % 2)} for i in range(12)]
    pd.DataFrame(rows).to_parquet(tmp_path / "f.parquet")
    df = load_dataset(tmp_path / "f.parquet", DatasetConfig(name="f", label_words={"0": " no", "1": " yes"}))
    assert sorted(set(df["label"])) == ["0", "1"]  # 1.0 reads as "1", the label value a user wrote
    rows[7]["label"] = float("nan")
    pd.DataFrame(rows).to_parquet(tmp_path / "f.parquet")
    with pytest.raises(DatasetError, match=r"f.parquet, row 8: empty label"):
        load_dataset(tmp_path / "f.parquet", DatasetConfig(name="f", label_words={"0": " no", "1": " yes"}))


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "u.jsonl"
    rows = good_rows(6)
    rows[1]["text"] = "plot twist:\u2028the butler did it"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert load_dataset(path, DatasetConfig(name="u"))["text"].iloc[1] == "plot twist: the butler did it"


def test_train_split_must_hold_every_class(tmp_path):
    rows = [{**r, "split": "train" if r["label"] == "pos" else ("validation" if i % 4 == 0 else "test")}
            for i, r in enumerate(good_rows())]
    with pytest.raises(DatasetError, match=r"lacks.csv: train split lacks class\(es\): \{'neg': 0\}"):
        load_dataset(write_csv(tmp_path / "lacks.csv", rows), DatasetConfig(name="lacks"))
    rows = [{**r, "split": "train" if i == 0 else "validation"} for i, r in enumerate(good_rows())]
    with pytest.raises(DatasetError, match=r"one.csv: train split lacks .* 1 train rows in all"):
        load_dataset(write_csv(tmp_path / "one.csv", rows), DatasetConfig(name="one"))
    rows = [{**r, "split": "train" if i < 4 else "validation"} for i, r in enumerate(good_rows())]
    load_dataset(write_csv(tmp_path / "ok.csv", rows), DatasetConfig(name="ok"))  # both classes in 4 train rows
    with pytest.raises(DatasetError, match="needs at least 3"):
        load_dataset(tmp_path / "ok.csv", DatasetConfig(name="ok"), limits=InputLimits(min_train_per_class=3))


def test_scan_refuses_links_out_of_the_folder_and_keeps_the_good_files(tmp_path):
    import os

    folder = tmp_path / "data"
    folder.mkdir()
    write_csv(folder / "good.csv", good_rows())
    write_csv(tmp_path / "secret.csv", good_rows())
    (folder / "outside.csv").symlink_to(tmp_path / "secret.csv")
    (folder / "relative.csv").symlink_to(Path("..") / "secret.csv")
    (folder / "sub").mkdir()
    write_csv(folder / "sub" / "inner.csv", good_rows())
    (folder / "inside.csv").symlink_to(folder / "sub" / "inner.csv")
    (folder / "dangling.csv").symlink_to(folder / "nothing.csv")
    (folder / "adir.csv").mkdir()
    os.mkfifo(folder / "pipe.csv")
    write_csv(folder / "shout.CSV", good_rows())
    found, problems = scan(folder)
    assert sorted(found) == ["good", "inside"]
    by_file = {Path(p.file).name: p.problem for p in problems}
    assert set(by_file) == {"outside.csv", "relative.csv", "dangling.csv", "adir.csv", "pipe.csv", "shout.CSV"}
    assert "outside the datasets folder" in by_file["outside.csv"] and "refused" in by_file["relative.csv"]
    assert "broken symlink" in by_file["dangling.csv"] and "not a regular file" in by_file["pipe.csv"]
    with pytest.raises(DatasetError, match=r"adir.csv: not a regular file"):  # discover: the first problem
        discover(folder)
    with pytest.raises(DatasetError, match=r"cannot list the datasets folder"):
        scan(tmp_path / "missing")


def test_duplicate_names_drop_both_files(tmp_path):
    write_csv(tmp_path / "same.csv", good_rows())
    pd.DataFrame(good_rows()).to_parquet(tmp_path / "same.parquet")
    write_csv(tmp_path / "other.csv", good_rows())
    found, problems = scan(tmp_path)
    assert list(found) == ["other"] and [Path(p.file).name for p in problems] == ["same.parquet"]


@pytest.mark.parametrize("yaml_text, problem", [
    ("defaults:\n  split_fractions: [0.5, 0.2, 0.2]\n", "defaults.split_fractions must be three non-negative numbers summing to 1"),
    ("defaults:\n  split_fractions: [a, b, c]\n", "defaults.split_fractions must hold numbers"),
    ("datasets:\n  x:\n    split_fractions: [0.8, 0.2]\n", "datasets.x.split_fractions must be a list of three numbers"),
    ("datasets:\n  x:\n    split_fractions: 0.6\n", "datasets.x.split_fractions must be a list of three numbers"),
    ("datasets:\n  x:\n    split_fractions: [1.0, 0.0, 0.0]\n", "train and validation fractions must be > 0"),
    ("datasets:\n  x:\n    split_fractions: [.nan, 0.5, 0.5]\n", "summing to 1"),
    ("datasets:\n  - x\n", "datasets must be a mapping"),
    ("- x\n", "expected a mapping with top-level keys"),
    ("datasets: {x: {label_words: [a, b]}}\n", "datasets.x.label_words must map each label value to its word"),
    ("datasets: {x: {label_words: {a: ''}}}\n", "datasets.x.label_words.a: the word must be a non-empty string"),
    ("datasets: {x: {label_words: {~: ' a'}}}\n", "datasets.x.label_words: a label value is empty"),
    ("datasets: {x: {task_type: [a]}}\n", "datasets.x.task_type must be a non-empty string"),
    ("defaults: {template: 'Q: {text'}\n", "defaults.template: not a valid template"),
    ("defaults: {template: [a]}\n", "defaults.template must be a non-empty string"),
    ("datasets:\n\tx: {}\n", "not valid YAML"),
    ("datasets: {Bad Name: {}}\n", "datasets: invalid dataset name 'Bad Name'"),
])
def test_bad_settings_are_one_config_error_naming_the_file(tmp_path, yaml_text, problem):
    cfg = tmp_path / "datasets.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_suite_config(cfg)
    assert str(e.value).startswith(f"{cfg}: ") and problem in str(e.value) and "\n" not in str(e.value)


def test_config_bytes_and_folder(tmp_path):
    cfg = tmp_path / "datasets.yaml"
    cfg.write_bytes("datasets:\n  x:\n    task_type: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"datasets.yaml: undecodable bytes \(not UTF-8\) at byte"):
        load_suite_config(cfg)
    cfg.unlink()
    cfg.mkdir()
    with pytest.raises(ConfigError, match=r"datasets.yaml: not a regular file"):
        load_suite_config(cfg)


def test_split_fractions_of_a_config_built_in_code_are_checked_too(tmp_path):
    path = write_csv(tmp_path / "s.csv", good_rows())
    with pytest.raises(DatasetError, match=r"s.csv: split_fractions of 's' must be three non-negative numbers"):
        load_dataset(path, DatasetConfig(name="s", split_fractions=(0.5, 0.5, 0.5)))


def test_reliability_probe_rejects_every_bad_input_clearly(tmp_path):
    """The bad-input corpus of benchmarks/reliability.py (all but its three slow, large-file cases): every case
    is a DatasetError naming the file (and row), every control passes, and the JSON has every section's keys."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import reliability

    slow = {"rows_over_max_rows", "text_20mb_jsonl", "text_20mb_csv"}
    names = [n for n, _, _ in reliability.CASES if n not in slow]
    out = tmp_path / "reliability.json"
    res = reliability.main(["--sections", "bad_inputs", "--out", str(out), "--cases", *names])
    details = res["sections"]["bad_inputs"]
    assert res["bad_inputs_tried"] >= 50 and res["bad_inputs_unclear"] == 0, \
        [c for c in details["cases"] if c["outcome"] not in ("clear", "accepted")]
    assert details["controls_tried"] >= 5 and details["controls_rejected"] == 0
    saved = json.loads(out.read_text())
    for key in ("bad_inputs_tried", "bad_inputs_unclear", "tracebacks", "data_lost", "kill_trials",
                "kill_consistent", "stale_runs_left", "concurrent_runs", "concurrent_broken_homes", "worse_promoted"):
        assert key in saved
    assert saved["kill_trials"] is None and saved["sections"]["kill"]["status"] == "not run"
