"""Multi-task data for the gist compressor (training/methods/gist_compressor.py): many tasks, each with
several paraphrased instructions, so the compressor learns to compress instructions, not to memorise them.

Templated tasks are built from short texts (words of real sentences when given, else a built-in list);
real tasks (sentiment, spam, question type, capitals) are passed in by the caller, read offline from the
bench extra's packages (bench/common/real_data.py). Splits are fixed: the tasks in HELD_OUT_TASKS are never
trained on, and the last paraphrase of every task is never trained on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HELD_OUT_TASKS = ("last_word", "lowercase", "sms_spam", "odd_or_even")
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "warm",
    "mat",
    "while",
    "rain",
    "fell",
    "outside",
    "and",
    "a",
    "small",
    "dog",
    "slept",
    "near",
    "the",
    "old",
    "door",
    "music",
    "played",
    "softly",
    "in",
    "the",
    "kitchen",
    "where",
    "bread",
    "was",
    "baking",
    "for",
    "the",
    "morning",
    "market",
    "crowd",
]
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class GistTask:
    name: str
    instructions: tuple[str, ...]  # >= 3 paraphrases; the last is held out (unless hold_out_last is False)
    examples: tuple[tuple[str, str], ...]  # (input, target)
    hold_out_last: bool = True  # False: every paraphrase is trained on (a user's own task files)

    @property
    def train_instructions(self) -> tuple[str, ...]:
        if not self.hold_out_last or len(self.instructions) < 2:
            return self.instructions
        return self.instructions[:-1]

    @property
    def held_out_instruction(self) -> str:
        return self.instructions[-1]


def prompt_text(x: str) -> str:
    """The request text of one example (what a client sends as `prompt` to a compressed task)."""
    return f"\nInput: {x}\nOutput:"


def target_text(y: str) -> str:
    return f" {y}"


Make = Callable[[random.Random, list[str]], tuple[str, str]]


def _phrase(rng: random.Random, words: list[str], lo: int = 2, hi: int = 6) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]


def _templated() -> dict[str, tuple[tuple[str, ...], Make]]:
    def text_task(f: Callable[[list[str]], str]) -> Make:
        def make(rng: random.Random, words: list[str]) -> tuple[str, str]:
            x = _phrase(rng, words)
            return x, f(x.split())

        return make

    def digits_task(f: Callable[[list[int]], str]) -> Make:
        def make(rng: random.Random, words: list[str]) -> tuple[str, str]:
            d = _digits(rng)
            return " ".join(map(str, d)), f(d)

        return make

    def number_task(f: Callable[[int], str]) -> Make:
        def make(rng: random.Random, words: list[str]) -> tuple[str, str]:
            n = rng.randint(1, 98)
            return str(n), f(n)

        return make

    return {
        "uppercase": (
            (
                "Rewrite the text in capital letters.",
                "Convert the input to uppercase.",
                "Write the same words, all in upper case.",
                "Make every letter of the text a capital.",
            ),
            text_task(lambda w: " ".join(w).upper()),
        ),
        "lowercase": (
            (
                "Rewrite the text in small letters.",
                "Convert the input to lowercase.",
                "Write the same words with no capital letters.",
            ),
            lambda rng, words: ((x := _phrase(rng, words).upper()), x.lower()),
        ),
        "reverse_words": (
            (
                "Reverse the order of the words.",
                "Write the words backwards, last word first.",
                "Say the words in reverse order.",
                "Flip the word order of the input.",
            ),
            text_task(lambda w: " ".join(reversed(w))),
        ),
        "first_word": (
            (
                "What is the first word? Answer with that word.",
                "Repeat only the first word of the input.",
                "Give the word the text starts with.",
                "Output the opening word only.",
            ),
            text_task(lambda w: w[0]),
        ),
        "last_word": (
            (
                "What is the last word? Answer with that word.",
                "Repeat only the final word of the input.",
                "Give the word the text ends with.",
            ),
            text_task(lambda w: w[-1]),
        ),
        "count_words": (
            (
                "How many words are in the text? Answer with a number.",
                "Count the words in the input.",
                "Say how many words there are, as digits.",
                "Give the number of words.",
            ),
            text_task(lambda w: str(len(w))),
        ),
        "digits_to_words": (
            (
                "Write each digit as an English word.",
                "Spell out the digits in words.",
                "Translate the numbers into words, one word per digit.",
                "Replace every digit by its name.",
            ),
            digits_task(lambda d: " ".join(NUMBER_WORDS[i] for i in d)),
        ),
        "sort_words": (
            (
                "Sort the words in alphabetical order.",
                "Put the words in A to Z order.",
                "List the words alphabetically.",
                "Order the words from a to z.",
            ),
            text_task(lambda w: " ".join(sorted(w))),
        ),
        "acronym": (
            (
                "Write the first letter of each word.",
                "Make an acronym from the words.",
                "Give the initials of the words, together.",
                "Take the first letter of every word.",
            ),
            text_task(lambda w: "".join(x[0] for x in w)),
        ),
        "repeat_twice": (
            (
                "Repeat the text two times.",
                "Say the input twice.",
                "Write the words, then write them again.",
                "Echo the text two times in a row.",
            ),
            text_task(lambda w: " ".join(w + w)),
        ),
        "add_one": (
            (
                "Add one to the number.",
                "What number comes next? Answer with digits.",
                "Increase the number by 1.",
                "Give the number plus one.",
            ),
            number_task(lambda n: str(n + 1)),
        ),
        "odd_or_even": (
            (
                "Is the number odd or even? Answer odd or even.",
                "Say whether the number is even or odd.",
                "Label the number: odd or even.",
            ),
            number_task(lambda n: "even" if n % 2 == 0 else "odd"),
        ),
        "drop_first_word": (
            (
                "Remove the first word and keep the rest.",
                "Write the text without its first word.",
                "Delete the opening word.",
                "Copy everything except the first word.",
            ),
            text_task(lambda w: " ".join(w[1:])),
        ),
    }


def build_tasks(
    texts: Sequence[str] = (),
    real: dict[str, tuple[Sequence[str], Sequence[tuple[str, str]]]] | None = None,
    per_task: int = 200,
    seed: int = 0,
) -> list[GistTask]:
    """Templated tasks (words drawn from `texts`, else WORDS) plus `real`: name -> (instructions, pairs).
    Examples are capped at `per_task` per task."""
    words = sorted({w.strip(".,!?\"'()").lower() for t in texts for w in t.split()} - {""}) or list(WORDS)
    words = [w for w in words if w.isalpha() and 2 <= len(w) <= 8] or list(WORDS)
    tasks = []
    for name, (instructions, make) in _templated().items():
        rng = random.Random(f"{seed}:{name}")
        examples = tuple(make(rng, words) for _ in range(per_task))
        tasks.append(GistTask(name, tuple(instructions), examples))
    for name, (paraphrases, pairs) in sorted((real or {}).items()):
        rng = random.Random(f"{seed}:{name}")
        chosen = [(x[:200], y) for x, y in pairs if len(x) <= 200]
        rng.shuffle(chosen)
        tasks.append(GistTask(name, tuple(paraphrases), tuple(chosen[:per_task])))
    return tasks


def split_tasks(tasks: Sequence[GistTask]) -> tuple[list[GistTask], list[GistTask]]:
    """(trained tasks, held-out tasks): fixed by HELD_OUT_TASKS."""
    return [t for t in tasks if t.name not in HELD_OUT_TASKS], [t for t in tasks if t.name in HELD_OUT_TASKS]


def eval_examples(task: GistTask, n: int) -> tuple[tuple[str, str], ...]:
    """The last n examples: never drawn for training (training draws from the others)."""
    return task.examples[-n:]


def train_examples(task: GistTask, n_eval: int) -> tuple[tuple[str, str], ...]:
    return task.examples[: len(task.examples) - n_eval]
