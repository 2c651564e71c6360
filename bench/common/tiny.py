"""The benchmarks' tiny Llama: hidden 64, 2 layers, GQA 4/2 heads, 4,096 positions, random weights."""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama(vocab: int, seed: int = 0, **config: Any) -> Any:
    """A LlamaForCausalLM in eval mode, weights drawn after torch.manual_seed(seed); `config` adds or
    overrides LlamaConfig fields (e.g. token ids, max_position_embeddings). The tests' tiny model too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    }
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **(shape | config))).eval()
