"""BIG-bench classification tasks read generically, and the ones the `scale` data pack takes.

A BIG-bench JSON task (`bigbench/benchmark_tasks/<task>/task.json` in the bigbench sdist) qualifies as a
classification dataset when its answers come from one small fixed label set:

* `target_scores` tasks: every example scores the SAME answers (2 to `MAX_LABELS` of them) and one answer
  scores highest (examples with a tie are skipped);
* `target` tasks: every example has one target, and all targets together take 2 to `MAX_LABELS` values.

`read_task` enforces this rule and raises `SourceError` naming the task and the reason when a task does not
qualify, so a listed task that stops qualifying fails the build instead of slipping through. The data pack then
asks for enough examples (`Preset.min_examples`) and labels with enough examples (`Preset.min_per_label`).

The prompt follows the task's own format: its instruction (`task_prefix`, shortened to `PREFIX_CHARS`), the
example's input prefix (BIG-bench's default "Q: "), the input, the answer options, and its output prefix (default
"A:"). Labels are the task's answers normalized ("Yes." -> "yes", "(a)" -> "a"); the label word the model should
say is the label itself, except for a few spellings whose first tokens could not be told apart or carry no
meaning (digits, T/F, Hindi yes/no: `WORDS`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping

from grouplora.ml.sources import (BIGBENCH, BIGBENCH_ROOT, Example, Source, SourceError, _BB_LICENSE, _one,
                                  clean_text)

MAX_LABELS = 10
PREFIX_CHARS = 300  # a task instruction longer than this is cut at a sentence end: it repeats in every prompt
DEFAULT_INPUT_PREFIX = "\nQ: "  # BIG-bench's defaults when a task names none
DEFAULT_OUTPUT_PREFIX = "\nA: "

# Answers spelled so that their first tokens collide or mean little to the model, and the word used instead.
WORDS = {"T": "true", "F": "false", "हां": "yes", "नहीं": "no",
         **{str(i): w for i, w in enumerate("zero one two three four five six seven eight nine".split())}}


def normalize_label(answer: str) -> str:
    """'Yes.' -> 'yes', '(a)' -> 'a', 'Named Entities' -> 'named entities'; single characters keep their case."""
    s = answer.strip().rstrip(".").strip()
    if len(s) > 2 and s[0] == "(" and s[-1] == ")":
        s = s[1:-1].strip()
    return s if len(s) == 1 else s.lower()


def label_word(label: str) -> str:
    """The answer word for a label (leading space): `WORDS` or the label, without a leading article."""
    words = WORDS.get(label, label).split()
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " " + " ".join(words)


def shorten(text: str, limit: int = PREFIX_CHARS) -> str:
    """`text` if short enough, else cut after its last sentence end (or word) before `limit` characters."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    ends = [m.end() for m in re.finditer(r"[.?!:](\s|$)|\n", head)]
    cut = ends[-1] if ends and ends[-1] >= limit // 3 else (head.rfind(" ") if " " in head else limit)
    return head[:cut].rstrip()


def _escape(s: str) -> str:
    return s.replace("{", "{{").replace("}", "}}")  # task text is data, never a template placeholder


def task_template(task: Mapping) -> str:
    """The prompt template: instruction, input prefix, {text}, options, output prefix, ending at the answer."""
    prefix = task.get("task_prefix") or ""
    inp = task.get("example_input_prefix")
    out = task.get("example_output_prefix")
    inp = DEFAULT_INPUT_PREFIX if inp is None else inp
    out = DEFAULT_OUTPUT_PREFIX if out is None else out
    head = _escape(shorten(prefix.strip()) + inp).lstrip()
    tail = _escape(out).rstrip()
    if not tail.endswith((":", "?")):  # the label word must follow a cue, not the end of the options line
        tail += "\nAnswer:"
    return f"{head}{{text}}\nOptions: {{options}}.{tail}"


@dataclass(frozen=True)
class Part:
    """Keep example i (0-based, in file order) when i % of == index: disjoint slices of aligned translations."""

    index: int
    of: int
    aligned_with: str  # the task whose gold labels must match example for example (checked)


def task_answers(task: Mapping, archive: str, member: str) -> tuple[list[str], list[str | None]]:
    """(label set in the task's order, gold label per example or None when tied), by the rule above."""
    examples = task.get("examples") if isinstance(task, Mapping) else None
    if not isinstance(examples, list) or not examples:
        raise SourceError(archive, member, "no 'examples' list")
    if all(isinstance(ex, dict) and isinstance(ex.get("target_scores"), dict) for ex in examples):
        keys = list(examples[0]["target_scores"])
        for i, ex in enumerate(examples, start=1):
            if set(ex["target_scores"]) != set(keys):
                raise SourceError(archive, member, "does not qualify: the answers differ between examples "
                                  f"({sorted(keys)[:5]} vs {sorted(ex['target_scores'])[:5]})", row=i)
        labels = [normalize_label(k) for k in keys]
        golds: list[str | None] = []
        for i, ex in enumerate(examples, start=1):
            try:
                scores = {k: float(v) for k, v in ex["target_scores"].items()}
            except (TypeError, ValueError):
                raise SourceError(archive, member, f"non-numeric target_scores {ex['target_scores']}", row=i) from None
            best = max(scores.values())
            top = [k for k, v in scores.items() if v == best]
            golds.append(normalize_label(top[0]) if len(top) == 1 else None)
    else:
        golds = []
        for i, ex in enumerate(examples, start=1):
            target = ex.get("target") if isinstance(ex, dict) else None
            if isinstance(target, list):
                if len(target) != 1:
                    raise SourceError(archive, member, f"does not qualify: {len(target)} acceptable targets", row=i)
                target = target[0]
            if not isinstance(target, str) or not target.strip():
                raise SourceError(archive, member, "example has neither target_scores nor a target", row=i)
            golds.append(normalize_label(target))
        labels = list(dict.fromkeys(g for g in golds if g is not None))
    if len(set(labels)) != len(labels):
        raise SourceError(archive, member, f"answers that normalize to the same label: {labels}")
    if not 2 <= len(labels) <= MAX_LABELS:
        raise SourceError(archive, member, f"does not qualify: {len(labels)} labels (need 2 to {MAX_LABELS})")
    words = [label_word(lab).split()[0].lower() for lab in labels]
    if len(set(words)) != len(words):
        raise SourceError(archive, member, f"label words with the same first word: {words}")
    return labels, golds


def _load(members: Mapping[str, bytes], archive: str, task: str) -> tuple[str, dict]:
    member, data = _one({k: v for k, v in members.items() if k.endswith(f"/benchmark_tasks/{task}/task.json")},
                        archive, f"{BIGBENCH_ROOT}{task}/task.json")
    try:
        return member, json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(archive, member, f"invalid JSON: {e}") from None


def read_task(members: Mapping[str, bytes], archive: str, task: str, part: Part | None = None) -> list[Example]:
    """The examples of one qualifying task (input text, normalized gold label); empty inputs are skipped."""
    member, obj = _load(members, archive, task)
    _, golds = task_answers(obj, archive, member)
    if part is not None:
        ref_member, ref = _load(members, archive, part.aligned_with)
        _, ref_golds = task_answers(ref, archive, ref_member)
        if golds != ref_golds:
            raise SourceError(archive, member, f"not aligned with {part.aligned_with} example for example: "
                              "disjoint slices by position would not keep the translations apart")
    out = []
    for i, (ex, gold) in enumerate(zip(obj["examples"], golds)):
        if gold is None or (part is not None and i % part.of != part.index):
            continue
        if not isinstance(ex.get("input"), str):
            raise SourceError(archive, member, "example without a string 'input'", row=i + 1)
        text = clean_text(ex["input"])
        if text:
            out.append(Example(text, gold))
    return out


def task_prompt(members: Mapping[str, bytes], archive: str, task: str) -> tuple[str, dict[str, str]]:
    """(template with {options}, {label: label word} in the task's label order) for a qualifying task."""
    member, obj = _load(members, archive, task)
    labels, _ = task_answers(obj, archive, member)
    if "{options}" in (obj.get("task_prefix") or ""):
        raise SourceError(archive, member, "the task prefix contains '{options}', which the template reserves")
    return task_template(obj), {lab: label_word(lab) for lab in labels}


def dataset_name(task: str, part: str = "") -> str:
    """A data-format name for a task path: 'natural_instructions/subtask050_x' -> 'ni_050_x'."""
    name = re.sub(r"^natural_instructions/subtask", "ni_", task)
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + (f"_{part}" if part else "")


def task_source(task: str, task_type: str, reason: str, part: Part | None = None, name: str | None = None) -> Source:
    members = (f"{BIGBENCH_ROOT}{task}/task.json",) + ((f"{BIGBENCH_ROOT}{part.aligned_with}/task.json",)
                                                        if part else ())
    notes = ("generic BIG-bench reader (ml/bigbench.py): labels from the task's fixed answer set, examples with "
             "tied answers and empty inputs skipped, inputs longer than max_chars dropped (not cut); "
             f"qualifies: {reason}")
    if part:
        notes += (f"; keeps examples i with i % {part.of} == {part.index} so that no translated sentence is in "
                  f"two languages (gold labels checked equal to {part.aligned_with}'s, example for example)")
    return Source(name or dataset_name(task), BIGBENCH, members,
                  lambda m, a: read_task(m, a, task, part), task_type, _BB_LICENSE,
                  f"BIG-bench {task}", notes=notes, whole_text=True,
                  prompt=lambda m, a: task_prompt(m, a, task))


# --------------------------------------------------------------------------------------------- the scale list

# (task, task type, why it qualifies). Tasks the curated readers in sources.py already serve (fever, vitaminc,
# epistemic_reasoning, presuppositions_as_nli, strategyqa, intent_recognition) are not repeated here.
TASKS: tuple[tuple[str, str, str], ...] = (
    ("anachronisms", "yes_no_qa", "Yes/No target_scores, 230 examples"),
    ("analogical_similarity", "analogy", "7 fixed similarity categories, 323 examples"),
    ("analytic_entailment", "nli", "entailment/no-entailment, 70 examples"),
    ("causal_judgment", "yes_no_qa", "Yes/No about causation stories, 190 examples"),
    ("color/hcl", "color", "10 fixed colour names, 1,000 examples"),
    ("color/hex", "color", "10 fixed colour names, 1,000 examples"),
    ("color/hsl", "color", "10 fixed colour names, 1,000 examples"),
    ("color/rgb", "color", "10 fixed colour names, 1,000 examples"),
    ("cs_algorithms/lcs", "algorithmic", "LCS length 0-9, 320 examples"),
    ("cs_algorithms/valid_parentheses", "algorithmic", "Valid/Invalid, 1,000 examples"),
    ("dark_humor_detection", "humor", "joke/not a joke, 80 examples"),
    ("emojis_emotion_prediction", "emotion", "8 fixed emotions (argmax of soft scores), 131 examples"),
    ("empirical_judgments", "causal_relation", "causal/correlative/neutral, 99 examples"),
    ("entailed_polarity", "yes_no_qa", "yes/no, 149 examples"),
    ("entailed_polarity_hindi", "yes_no_qa", "Hindi yes/no, 142 examples"),
    ("fact_checker/covid19_scientific", "fact_verification", "true/false, 142 examples"),
    ("fact_checker/politifact", "fact_verification", "true/false, 400 examples"),
    ("fantasy_reasoning", "yes_no_qa", "Yes/No, 201 examples"),
    ("formal_fallacies_syllogisms_negation", "logic", "valid/invalid, 14,200 examples"),
    ("hinglish_toxicity", "toxicity", "yes/no toxic, 200 examples"),
    ("hyperbaton", "grammar", "adjective order a/b, 50,000 examples"),
    ("implicatures", "pragmatics", "yes/no implied answer, 492 examples"),
    ("international_phonetic_alphabet_nli", "nli", "3-way NLI in IPA, 126 examples"),
    ("irony_identification", "irony", "ironic/not ironic, 99 examples"),
    ("logical_fallacy_detection", "logic", "Valid/Invalid, 2,800 examples"),
    ("mathematical_induction", "logic", "Yes/No correct induction, 70 examples"),
    ("metaphor_boolean", "figurative", "True/False paraphrase of a metaphor, 680 examples"),
    ("misconceptions", "true_false", "T/F, 219 examples"),
    ("moral_permissibility", "moral", "Yes/No, 342 examples"),
    ("movie_dialog_same_or_different", "dialogue", "same/different speaker, 50,000 examples"),
    ("navigate", "spatial", "True/False back at the start, 1,000 examples"),
    ("play_dialog_same_or_different", "dialogue", "same/different speaker, 3,264 examples"),
    ("salient_translation_error_detection", "translation_error", "6 fixed error types, 998 examples"),
    ("sentence_ambiguity", "true_false", "True/False, 60 examples"),
    ("snarks", "sarcasm", "which of (a)/(b) is sarcastic, 181 examples"),
    ("social_support", "social", "unsupportive/neutral/supportive, 897 examples"),
    ("sports_understanding", "plausibility", "plausible/implausible, 1,000 examples"),
    ("winowhy", "coreference", "correct/incorrect reasoning, 2,865 examples"),
    ("natural_instructions/subtask018_mctaco_temporal_reasoning_presence", "temporal", "Yes./No. targets, 1,199"),
    ("natural_instructions/subtask019_mctaco_temporal_reasoning_category", "temporal", "Yes./No. targets, 1,200"),
    ("natural_instructions/subtask020_mctaco_span_based_question", "temporal", "Yes./No. targets, 1,199"),
    ("natural_instructions/subtask021_mctaco_grammatical_logical", "grammar", "Yes./No. targets, 1,199"),
    ("natural_instructions/subtask022_cosmosqa_passage_inappropriate_binary", "appropriateness",
     "Yes./No. targets, 500"),
    ("natural_instructions/subtask027_drop_answer_type_generation", "answer_type",
     "Number./Date./Span. targets, 6,500"),
    ("natural_instructions/subtask047_misc_answering_science_questions", "science_qa", "A./B./C./D. targets, 251"),
    ("natural_instructions/subtask050_multirc_answerability", "answerability", "Yes./No. targets, 6,500"),
)

# Qualify by the rule but left out, and why.
EXCLUDED: dict[str, str] = {
    "cifar10_classification/*": "images encoded as base64 or hex pixel values, not text",
    "mnist_ascii": "ASCII-art digits, not text",
    "intersect_geometry/*": "41 possible answers (0-40): not a small label set",
    "natural_instructions/subtask05[267]_multirc_*": "paragraph inputs: fewer than 60 fit the scale pack's max_chars",
    "multiemo/all_*": "the union of the four domains: it would repeat their sentences",
    "multiemo/*_text_*": "whole reviews whose sentences are the *_sentence_* sets: they would repeat them",
    "multiemo/hotels_sentence_de": "one example fewer than the other languages: not aligned, slices could overlap",
    "multiemo/medicine_sentence_pt": "1,273 examples fewer than the other languages: not aligned",
}

# MultiEmo: 4 domains x 11 languages of machine-translated review sentences, positive/negative/neutral/ambivalent.
# Language j keeps every 11th sentence from j on, so no sentence is in the pack in two languages.
MULTIEMO_DOMAINS = ("hotels", "medicine", "products", "reviews")
MULTIEMO_LANGS = ("en", "de", "es", "fr", "it", "ja", "nl", "pl", "pt", "ru", "zh")


def multiemo_sources() -> list[Source]:
    out = []
    for domain in MULTIEMO_DOMAINS:
        for j, lang in enumerate(MULTIEMO_LANGS):
            task = f"multiemo/{domain}_sentence_{lang}"
            if task in EXCLUDED:
                continue
            part = Part(j, len(MULTIEMO_LANGS), f"multiemo/{domain}_sentence_en")
            out.append(task_source(task, "sentiment", "4 fixed sentiment labels, "
                                   f"1/{part.of} of the {domain} sentences", part))
    return out


SOURCES: dict[str, Source] = {s.name: s for s in
                              [task_source(t, tt, why) for t, tt, why in TASKS] + multiemo_sources()}
