"""The dataset format: every bad input named in the README gets an error with the file, the row and the problem."""

import json
from pathlib import Path

import pandas as pd
import pytest

from grouplora.ml.data_format import (DatasetConfig, DatasetError, discover, load_dataset, load_suite_config,
                                      stratified_split, validate_name)


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
