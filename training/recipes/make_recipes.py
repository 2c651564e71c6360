"""Generate the shipped task sets deterministically: `python -m training.recipes.make_recipes`.

Each set is JSONL of {"instruction", "input", "output"}; every record carries one of a few paraphrases of
its task's instruction (gist training then learns to compress instructions, not to memorise one string).

- sentiment: templated product/place reviews -> "positive" | "negative" (label-word classification)
- dates:     ISO dates "2021-03-05" -> "March 5, 2021" (format conversion)
- uppercase: short lower-case phrases -> the same phrase in capital letters (style rewrite)
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601
SIZE = 300

SUBJECTS = [
    "The movie",
    "This restaurant",
    "The hotel room",
    "My new phone",
    "The concert",
    "This book",
    "The coffee",
    "The service",
    "This laptop",
    "The museum tour",
    "The pizza",
    "Our flight",
    "The new album",
    "This game",
    "The museum cafe",
    "The delivery",
    "The hiking trail",
    "This jacket",
]
POSITIVE = [
    "was absolutely wonderful",
    "exceeded all my expectations",
    "made my whole week",
    "was a real delight",
    "is worth every penny",
    "felt warm and welcoming",
    "was fantastic from start to finish",
    "left me smiling for hours",
    "was beautifully done",
    "is the best I have tried",
]
NEGATIVE = [
    "was a complete waste of money",
    "left me bored and annoyed",
    "was awful from start to finish",
    "broke after two days",
    "was cold, slow and rude",
    "is the worst I have tried",
    "was a huge disappointment",
    "made me want to leave early",
    "felt cheap and badly made",
    "was not worth the wait",
]
ENDINGS = [
    "",
    " We went on a Tuesday.",
    " That is all.",
    " Just my opinion.",
    " There were four of us.",
    " Noted.",
]
SENTIMENT_INSTRUCTIONS = [
    "Classify the sentiment of the review as positive or negative.",
    "Is this review positive or negative? Answer with one word.",
    "Label the review: positive or negative.",
]

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
DATE_INSTRUCTIONS = [
    "Rewrite the date in the format Month D, YYYY.",
    "Convert this ISO date to a written date like March 5, 2021.",
    "Write the date out with the month name.",
]

WORDS = [
    "green",
    "river",
    "quiet",
    "morning",
    "paper",
    "window",
    "silver",
    "garden",
    "happy",
    "stone",
    "coffee",
    "little",
    "orange",
    "music",
    "yellow",
    "winter",
    "summer",
    "bright",
    "cloud",
    "forest",
    "light",
    "ocean",
    "simple",
    "table",
    "candle",
    "purple",
    "travel",
    "friend",
    "pencil",
    "market",
]
UPPER_INSTRUCTIONS = [
    "Rewrite the text in capital letters.",
    "Convert the text to uppercase.",
    "Shout it: repeat the text in all caps.",
]


def sentiment(rng: random.Random, i: int) -> dict[str, str]:
    positive = i % 2 == 0
    phrase = rng.choice(POSITIVE if positive else NEGATIVE)
    text = f"{rng.choice(SUBJECTS)} {phrase}.{rng.choice(ENDINGS)}"
    return {"input": text, "output": "positive" if positive else "negative"}


def dates(rng: random.Random, i: int) -> dict[str, str]:
    day = dt.date(1990, 1, 1) + dt.timedelta(days=rng.randrange(0, 365 * 40))
    return {"input": day.isoformat(), "output": f"{MONTHS[day.month - 1]} {day.day}, {day.year}"}


def uppercase(rng: random.Random, i: int) -> dict[str, str]:
    text = " ".join(rng.sample(WORDS, rng.randint(2, 3)))
    return {"input": text, "output": text.upper()}


RECIPES: dict[str, tuple[Callable[[random.Random, int], dict[str, str]], list[str]]] = {
    "sentiment": (sentiment, SENTIMENT_INSTRUCTIONS),
    "dates": (dates, DATE_INSTRUCTIONS),
    "uppercase": (uppercase, UPPER_INSTRUCTIONS),
}


def generate(name: str, size: int = SIZE, seed: int = SEED) -> list[dict[str, str]]:
    """The records of one recipe: unique inputs, deterministic for a given (name, size, seed)."""
    make, instructions = RECIPES[name]
    rng = random.Random(f"{seed}-{name}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < size:
        row = make(rng, len(rows))
        if row["input"] in seen:
            continue
        seen.add(row["input"])
        rows.append({"instruction": instructions[len(rows) % len(instructions)], **row})
    return rows


def recipe_path(name: str) -> Path:
    return HERE / f"{name}.jsonl"


def main() -> None:
    for name in RECIPES:
        rows = generate(name)
        recipe_path(name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{recipe_path(name)}: {len(rows)} records")


if __name__ == "__main__":
    main()
