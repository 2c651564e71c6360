"""Pieces every serving benchmark shares: the SmolLM2 runner, chat-formatted questions, the hardware line."""

from __future__ import annotations

import os
import platform

import torch

from server.model_runner import ModelRunner, load_model

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
    return (
        f"- model: {runner.name} ({runner.dtype}, {runner.device}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; {platform.machine()}, {os.cpu_count()} cores"
    )
