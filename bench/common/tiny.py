"""The benchmarks' tiny Llama: hidden 64, 2 layers, GQA 4/2 heads, 4,096 positions, random weights."""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama(vocab: int, **config: Any) -> Any:
    """A LlamaForCausalLM in eval mode, weights drawn after torch.manual_seed(0); `config` adds LlamaConfig
    fields (e.g. token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        **config,
    )
    return LlamaForCausalLM(cfg).eval()
