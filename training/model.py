"""Training's handle on the frozen base model: a thin view of the runtime's `ModelRunner`.

Loading (any Hugging Face name/path, or the embedded SmolLM2 from the safetensors cache the server uses),
the dtype/device policy and the HF_HUB_OFFLINE rule are `runtime.model_runner.load_model`'s. The runner
keeps the base model frozen (eval, requires_grad False); trainers still backpropagate through it into
their own inputs (input embeddings, KV prefixes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prompt_store import Fingerprint
from prompt_store.embedded_model import (  # noqa: F401 - re-exported for the CLI and tests
    COMPLETE_MARKER,
    DEFAULT_MODEL_NAME,
    default_cache_dir,
    ensure_smollm2,
    is_default,
)
from runtime import model_runner
from runtime.model_runner import ModelRunner


class LoadedModel:
    """A frozen model, its tokenizer and the name that goes into artifact fingerprints (the runtime's
    `ModelRunner` underneath: `runner` is what evaluation decodes with)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    @property
    def model(self) -> Any:
        return self.runner.model

    @property
    def tokenizer(self) -> Any:
        return self.runner.tokenizer

    @property
    def name(self) -> str:
        return self.runner.name

    def fingerprint(self) -> Fingerprint:
        return self.runner.fingerprint


def runner_for(model: Any, tokenizer: Any = None, name: str = "") -> ModelRunner:
    """The runtime runner of `model`: a `ModelRunner` or `LoadedModel` as is, a bare HF model wrapped (which
    freezes it, as training wants)."""
    if isinstance(model, ModelRunner):
        return model
    if isinstance(model, LoadedModel):
        return model.runner
    return ModelRunner.from_model(model, tokenizer, name)


def load_model(
    name_or_path: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load through `runtime.model_runner.load_model`: `None`/"smollm2" is the embedded SmolLM2, anything
    else an HF name or path; dtype "auto" is bfloat16 on CUDA and float32 on CPU."""
    return LoadedModel(model_runner.load_model(name_or_path, dtype=dtype, device=device, cache_dir=cache_dir))
