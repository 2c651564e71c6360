"""Pieces every serving benchmark shares: the SmolLM2 runner, chat-formatted questions, the hardware line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.model_runner import ModelRunner, load_model

QUESTIONS = [
    "Name a color of the sky.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in the park.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence for a child who is eight years old.",
    "Hi!",
    "Translate 'good morning' into Spanish.",
    "Give me three tips for better sleep.",
]


def bench_runner(device: str, dtype: str = "float32", threads: int = 0) -> ModelRunner:
    """The embedded SmolLM2 with eos ignored, so every row generates exactly the tokens asked for."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(None, dtype=dtype, device=device)
    return ModelRunner.from_model(loaded.model, loaded.tokenizer, loaded.name, eos_ids=frozenset())


def chat_ids(runner: ModelRunner, question: str) -> list[int]:
    """A question as one chat user turn with the generation prompt, as token ids."""
    msgs = [{"role": "user", "content": question}]
    raw = runner.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return [int(t) for t in (raw["input_ids"] if hasattr(raw, "keys") else raw)]


def hardware_line(runner: ModelRunner) -> str:
    device = torch.device(runner.device)
    where = (
        f"GPU {torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"{torch.get_num_threads()} CPU threads"
    )
    return (
        f"- model: {runner.name} ({runner.dtype}, {runner.device}); torch {torch.__version__}, "
        f"{where}; {platform.machine()}, {os.cpu_count()} cores"
    )


RESULTS = Path(__file__).resolve().parent / "results"
STARTED = time.monotonic()  # when the benchmark script imported the harness: its elapsed time in the JSON


@dataclass(frozen=True)
class Goal:
    """One line of the README's performance table: what was measured, the goal, the value, met or not."""

    measure: str  # e.g. "mixed-batch decode throughput / bare, 16 requests"
    target: str  # e.g. ">= 0.9"
    measured: str  # e.g. "1.008"
    met: bool


def write_report(name: str, markdown: str, goals: list[Goal], data: dict[str, Any] | None = None) -> Path:
    """Print the table; write bench/results/<name>.md and <name>.json (goals + raw data, for summary.py)."""
    print(markdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = RESULTS / f"{name}.md"
    md.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    payload = {
        "name": name,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "elapsed_s": round(time.monotonic() - STARTED, 1),
        "goals": [asdict(g) for g in goals],
        "data": data or {},
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {md} and {md.with_suffix('.json')}")
    return md


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--device (auto, cpu, cuda, cuda:N), --dtype and --threads, the same in every serving benchmark."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")


def savefig(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG next to its table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
