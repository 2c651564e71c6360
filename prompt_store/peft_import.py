"""Convert a PEFT prompt-learning adapter (PROMPT_TUNING, P_TUNING, PREFIX_TUNING) into an artifact.

Input: `adapter_config.json` (read as JSON only) and `adapter_model.safetensors` (bounded by our own header
checks before safetensors reads it). Pickle-based weights (`adapter_model.bin`, `.pt`, ...) are refused and
never opened.

PEFT saves one tensor, `prompt_embeddings`:
- PROMPT_TUNING / P_TUNING: `[m, d]` (for P_TUNING this is already the encoder output).
- PREFIX_TUNING: `[m, 2·L·H·Dh]` where, for a model whose config has `num_key_value_heads` (GQA or not), PEFT
  stores `num_attention_heads = Hkv` and `token_dim = Hkv·Dh` in the adapter config (else H = attention
  heads, token_dim = hidden size). `PeftModel.get_prompt` does
      view(B, m, 2L, H, Dh).permute(2, 0, 3, 1, 4).split(2)
  so layer l's key is row 2l and its value row 2l+1 of the 2L axis; per token the flat vector is laid out
  `[L, 2 (key, value), H, Dh]`. With `prefix_projection` PEFT saves the MLP output, so the layout is the same.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from prompt_store import strict_json
from prompt_store.artifact import check_tensor_table, make_artifact, read_header
from prompt_store.errors import ArtifactFormatError, TooLarge, UnsupportedAdapter, ValidationError
from prompt_store.methods.base import require_virtual_tokens
from prompt_store.task_id import validate_task_id
from prompt_store.types import Artifact, Fingerprint, Limits
from prompt_store.validation import validate_artifact

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 64 * 1024
SUPPORTED_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
SUPPORTED_TASK_TYPES = (None, "CAUSAL_LM")
_PROMPT_INIT = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}
_ENCODER_TYPES = {"MLP": "mlp", "LSTM": "lstm"}


def import_peft_adapter(
    path: str | os.PathLike[str], task_id: str, base: Fingerprint, limits: Limits | None = None
) -> Artifact:
    """Import a PEFT adapter directory (or its adapter_config.json) as a validated artifact for `base`."""
    validate_task_id(task_id)
    limits = limits or Limits()
    directory = Path(path)
    if directory.is_file() and directory.name == CONFIG_NAME:
        directory = directory.parent
    if not directory.is_dir():
        raise ArtifactFormatError(f"{directory} is not a PEFT adapter directory", field="path")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_refusal(pickles[0])
        raise ArtifactFormatError(f"{directory} has no {WEIGHTS_NAME}", field=WEIGHTS_NAME)
    files = {
        CONFIG_NAME: _read_bounded(directory / CONFIG_NAME, MAX_CONFIG_BYTES),
        WEIGHTS_NAME: _read_bounded(weights, limits.max_file_bytes),
    }
    return import_peft_files(files, task_id, base, limits)


def import_peft_files(
    files: Mapping[str, bytes], task_id: str, base: Fingerprint, limits: Limits | None = None
) -> Artifact:
    """Import an uploaded adapter: {"adapter_config.json": bytes, "adapter_model.safetensors": bytes}.

    Other non-pickle files (a README, ...) are ignored; any pickle-format file is refused.
    Raises UnsupportedAdapter, ArtifactFormatError, ValidationError (or TooLarge); never unpickles.
    """
    validate_task_id(task_id)
    limits = limits or Limits()
    pickles = sorted(name for name in files if Path(name).suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refusal(pickles[0])
    if CONFIG_NAME not in files:
        raise ArtifactFormatError(f"the adapter has no {CONFIG_NAME}", field=CONFIG_NAME)
    if WEIGHTS_NAME not in files:
        raise ArtifactFormatError(f"the adapter has no {WEIGHTS_NAME}", field=WEIGHTS_NAME)
    config = parse_adapter_config(files[CONFIG_NAME])
    peft_type = _check_supported(config)
    embeddings = read_prompt_embeddings(files[WEIGHTS_NAME], limits)  # [m, token_dim] or [m, 2·L·token_dim]
    m = require_virtual_tokens(config.get("num_virtual_tokens"), limits)
    _check_int_field(config, "num_layers", base.num_layers, required=peft_type == "PREFIX_TUNING")
    if peft_type == "PREFIX_TUNING":
        method, method_config, tensors = _convert_prefix(config, embeddings, m, base)
    else:
        method, method_config, tensors = _convert_prompt(config, peft_type, embeddings, m, base)
    artifact = make_artifact(task_id, method, method_config, tensors, base, notes=_notes(config))
    validate_artifact(artifact, base, limits)
    return artifact


def parse_adapter_config(data: bytes) -> dict[str, Any]:
    """adapter_config.json -> dict (bounded size, JSON object only)."""
    if len(data) > MAX_CONFIG_BYTES:
        raise TooLarge(
            f"{CONFIG_NAME} is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}", field=CONFIG_NAME
        )
    try:
        config = strict_json.loads(data)  # no NaN/Infinity, no lone surrogates: they would reach the manifest
    except (ValueError, RecursionError) as exc:
        raise ArtifactFormatError(f"{CONFIG_NAME} is not valid JSON: {exc}", field=CONFIG_NAME) from exc
    if not isinstance(config, dict):
        raise ArtifactFormatError(f"{CONFIG_NAME} must be a JSON object", field=CONFIG_NAME)
    return config


def read_prompt_embeddings(data: bytes, limits: Limits) -> torch.Tensor:
    """The single `prompt_embeddings` tensor of a PEFT safetensors file, after bounded header checks."""
    header = read_header(data, limits)
    header_len = struct.unpack("<Q", data[:8])[0]
    check_tensor_table(header, len(data) - 8 - header_len, limits)
    names = sorted(k for k in header if k != "__metadata__")
    if names != ["prompt_embeddings"]:
        raise ValidationError(
            f"{WEIGHTS_NAME} must hold exactly one tensor 'prompt_embeddings', found {names}",
            field="prompt_embeddings",
        )
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtifactFormatError(f"safetensors could not read {WEIGHTS_NAME}: {exc}", field="file") from exc
    embeddings = tensors["prompt_embeddings"]
    if embeddings.dim() != 2:
        raise ValidationError(
            f"prompt_embeddings must be 2-D, got shape {list(embeddings.shape)}", field="prompt_embeddings"
        )
    return embeddings


# ---- conversions ------------------------------------------------------------------------------------------


def _convert_prompt(
    config: Mapping[str, Any], peft_type: str, embeddings: torch.Tensor, m: int, base: Fingerprint
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """PROMPT_TUNING / P_TUNING: prompt_embeddings [m, d] is the prompt itself."""
    d = _check_int_field(config, "token_dim", base.hidden_size, required=False)
    _require_embedding_shape(embeddings, (m, d))
    prompt = embeddings  # [m, d]
    if peft_type == "PROMPT_TUNING":
        init = _PROMPT_INIT.get(str(config.get("prompt_tuning_init", "RANDOM")).upper(), "random")
        return "prompt_tuning", {"num_virtual_tokens": m, "init": init}, {"prompt": prompt}
    raw_encoder = str(config.get("encoder_reparameterization_type", "MLP")).upper()
    if raw_encoder not in _ENCODER_TYPES:
        raise ValidationError(
            f"encoder_reparameterization_type {raw_encoder!r} is not one of {sorted(_ENCODER_TYPES)}",
            field="encoder_reparameterization_type",
        )
    hidden = config.get("encoder_hidden_size")
    method_config = {
        "num_virtual_tokens": m,
        "encoder_type": _ENCODER_TYPES[raw_encoder],
        "encoder_hidden_size": hidden if isinstance(hidden, int) and not isinstance(hidden, bool) else 0,
    }
    return "p_tuning", method_config, {"prompt": prompt}


def _convert_prefix(
    config: Mapping[str, Any], embeddings: torch.Tensor, m: int, base: Fingerprint
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """PREFIX_TUNING: prompt_embeddings [m, 2·L·Hkv·Dh] -> keys, values [L, Hkv, m, Dh] as in get_prompt."""
    L, H, Dh = base.num_layers, base.num_kv_heads, base.head_dim
    _check_int_field(config, "num_attention_heads", H, required=True)
    _check_int_field(config, "token_dim", H * Dh, required=True)
    _require_embedding_shape(embeddings, (m, 2 * L * H * Dh))
    kv = embeddings.reshape(m, L, 2, H, Dh)  # [m, L, 2, Hkv, Dh]: PEFT's 2L axis is (layer, key|value)
    kv = kv.permute(2, 1, 3, 0, 4)  # [2, L, Hkv, m, Dh]
    keys, values = kv[0].contiguous(), kv[1].contiguous()  # [L, Hkv, m, Dh] each
    method_config = {"num_virtual_tokens": m, "projection": bool(config.get("prefix_projection", False))}
    return "prefix_tuning", method_config, {"keys": keys, "values": values}


# ---- checks -----------------------------------------------------------------------------------------------


def _check_supported(config: Mapping[str, Any]) -> str:
    """peft_type, task_type and num_transformer_submodules must describe a decoder-only prompt method."""
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise UnsupportedAdapter(
            f"PEFT adapter type {str(peft_type)[:40]!r} is not supported; softserve imports "
            f"{', '.join(SUPPORTED_PEFT_TYPES)} (weight-modifying adapters such as LoRA or IA3 cannot be "
            "served per request by a frozen shared model)",
            field="peft_type",
        )
    task_type = config.get("task_type")
    if task_type not in SUPPORTED_TASK_TYPES:
        raise UnsupportedAdapter(
            f"PEFT task_type {str(task_type)[:40]!r} is not supported; softserve serves CAUSAL_LM adapters",
            field="task_type",
        )
    submodules = config.get("num_transformer_submodules", 1)
    if submodules not in (None, 1):
        raise UnsupportedAdapter(
            f"num_transformer_submodules={str(submodules)[:20]} (an encoder-decoder adapter) is not "
            "supported; softserve serves decoder-only models (1 submodule)",
            field="num_transformer_submodules",
        )
    return str(peft_type)


def _check_int_field(config: Mapping[str, Any], name: str, expected: int, *, required: bool) -> int:
    """A config integer must equal what `base` needs; absent is allowed unless `required`."""
    value = config.get(name)
    if value is None and not required:
        return expected
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{CONFIG_NAME}: {name} must be an integer, got {value!r}"[:200], field=name)
    if value != expected:
        raise ValidationError(
            f"{CONFIG_NAME}: {name}={value} does not fit this base model, which needs {expected}", field=name
        )
    return value


def _require_embedding_shape(embeddings: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(embeddings.shape) != shape:
        raise ValidationError(
            f"prompt_embeddings has shape {list(embeddings.shape)}; this adapter config and base model need "
            f"{list(shape)}",
            field="prompt_embeddings",
        )


def _pickle_refusal(name: str) -> UnsupportedAdapter:
    return UnsupportedAdapter(
        f"{name!r} is a pickle-format checkpoint and softserve never unpickles uploads; re-save the adapter "
        f"with save_pretrained(..., safe_serialization=True) to get {WEIGHTS_NAME}",
        field=name,
    )


def _read_bounded(path: Path, limit: int) -> bytes:
    """Read a file, refusing anything larger than `limit` before reading it."""
    if not path.is_file():
        raise ArtifactFormatError(f"{path.name} is missing", field=path.name)
    size = path.stat().st_size
    if size > limit:
        raise TooLarge(f"{path.name} is {size} bytes; the limit is {limit}", field=path.name)
    return path.read_bytes()


def _notes(config: Mapping[str, Any]) -> str:
    base_name = str(config.get("base_model_name_or_path") or "?")[:200]
    version = str(config.get("peft_version") or "?")[:40]
    return f"imported from PEFT {config.get('peft_type')} (peft {version}, base {base_name})"
