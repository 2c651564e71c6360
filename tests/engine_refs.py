"""Plain references for engine tests (Hugging Face / PEFT only, no engine code) and soft-prompt builders."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from prompt_store import SoftPrompt, TaskPrompt, get_method
from server.requests import GenerationRequest, SamplingParams

PAD = 0


class IdTokenizer:
    """Deterministic id-level test tokenizer: id k <-> one character (specials 0, 1, 2 decode to '')."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?-"
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if i < 3 else self.ALPHABET[i % len(self.ALPHABET)] for i in ids)

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [3 + self.ALPHABET.index(c) for c in text]}


GEN: dict[str, Any] = {"do_sample": False, "pad_token_id": PAD, "eos_token_id": None}


@torch.inference_mode()
def ref_inputs_embeds(
    model: Any,
    ids: list[int],
    n_new: int,
    prompt: torch.Tensor | None = None,
    added: torch.Tensor | None = None,
) -> list[int]:
    """generate(inputs_embeds=[prompt ; embed(ids) (+ added on the first s)]): greedy new tokens."""
    x = model.get_input_embeddings()(torch.tensor(ids))  # [n, d]
    if added is not None:
        s = min(added.shape[0], len(ids))
        x = torch.cat([x[:s] + added[:s], x[s:]])  # [n, d]
    if prompt is not None:
        x = torch.cat([prompt, x])  # [m + n, d]
    mask = torch.ones(1, x.shape[0], dtype=torch.long)  # [1, m + n]
    out = model.generate(inputs_embeds=x[None], attention_mask=mask, max_new_tokens=n_new, **GEN)
    tokens = out[0, -n_new:].tolist()
    assert len(tokens) == n_new
    return tokens


@torch.inference_mode()
def ref_input_ids(model: Any, ids: list[int], n_new: int) -> list[int]:
    """Bare model (or a PeftModel with a prompt-tuning adapter): generate(input_ids)."""
    x = torch.tensor([ids])  # [1, n]
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, **GEN)
    assert out.shape[1] == len(ids) + n_new
    return out[0, len(ids) :].tolist()


@torch.inference_mode()
def ref_kv_prefix(model: Any, prompt: SoftPrompt, ids: list[int], n_new: int) -> list[int]:
    """Manual greedy loop: cache = KV prefix, mask over prefix + input, positions from next_position."""
    assert prompt.keys is not None and prompt.values is not None
    layers = [(prompt.keys[i][None], prompt.values[i][None]) for i in range(prompt.keys.shape[0])]
    cache = DynamicCache(ddp_cache_data=layers, config=model.config)
    m, pos = prompt.keys.shape[2], prompt.next_position
    x = torch.tensor([ids])  # [1, n]
    tokens: list[int] = []
    for _ in range(n_new):
        total = m + len(ids) + len(tokens)
        positions = torch.arange(pos, pos + x.shape[1])[None]  # [1, n]
        out = model(
            input_ids=x,
            attention_mask=torch.ones(1, total, dtype=torch.long),
            position_ids=positions,
            cache=cache,
        )
        tokens.append(int(out.logits[0, -1].argmax()))
        pos += x.shape[1]
        x = torch.tensor([[tokens[-1]]])  # [1, 1]
    return tokens


@torch.inference_mode()
def ref_generate_with_cache(model: Any, cache: DynamicCache, ids: list[int], n_new: int) -> list[int]:
    """generate(input_ids, cache=KV prefix, mask over prefix + input); positions continue after the prefix."""
    m = cache.get_seq_length()
    x = torch.tensor([ids])  # [1, n]
    mask = torch.ones(1, m + len(ids), dtype=torch.long)  # [1, m + n]
    out = model.generate(input_ids=x, attention_mask=mask, cache=cache, max_new_tokens=n_new, **GEN)
    return out[0, len(ids) :].tolist()


@torch.inference_mode()
def make_gist(model: Any, instruction_ids: list[int], gist_embeds: torch.Tensor) -> SoftPrompt:
    """Run instruction + gist embeddings; keep the gist positions' K/V and the position after them."""
    emb = model.get_input_embeddings()(torch.tensor(instruction_ids))  # [p, d]
    x = torch.cat([emb, gist_embeds])[None]  # [1, p + k, d]
    cache = DynamicCache(config=model.config)
    model(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long), cache=cache)
    p = len(instruction_ids)
    keys = torch.stack([layer.keys[0, :, p:] for layer in cache.layers])  # [L, Hkv, k, Dh]
    values = torch.stack([layer.values[0, :, p:] for layer in cache.layers])  # [L, Hkv, k, Dh]
    return SoftPrompt(keys=keys.clone(), values=values.clone(), next_position=x.shape[1])


def accept_prompt(d: int, m: int, s: int, seed: int, scale: float = 0.3) -> SoftPrompt:
    """An ACCEPT serving form (SCPP prompt + SCAP delta) through prompt_store's own method."""
    g = torch.Generator().manual_seed(seed)
    k, r, ka, ra = 4, 8, 2, 4
    tensors = {
        "prompt_weight": torch.randn(m, k, r, generator=g) * scale,  # [m, K, r]
        "prompt_codebook": torch.randn(k, r, d // k, generator=g),  # [K, r, d/K]
        "added_weight": torch.randn(s, ka, ra, generator=g) * scale,  # [s, Ka, ra]
        "added_codebook": torch.randn(ka, ra, d // ka, generator=g),  # [Ka, ra, d/Ka]
    }
    method = get_method("accept")
    cfg = method.parse_config(
        {
            "num_virtual_tokens": m,
            "num_subspaces": k,
            "num_codewords": r,
            "added_length": s,
            "added_subspaces": ka,
            "added_codewords": ra,
        }
    )
    prompt: SoftPrompt = method.to_serving_form(tensors, cfg)
    return prompt


def random_prompt(d: int, m: int, seed: int, scale: float = 0.5) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    return SoftPrompt(embeds=torch.randn(m, d, generator=g) * scale, next_position=m)


def random_prefix(fp: Any, m: int, seed: int, scale: float = 1.0) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    shape = (fp.num_layers, fp.num_kv_heads, m, fp.head_dim)
    keys, values = torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale
    return SoftPrompt(keys=keys, values=values, next_position=m)


def task(task_id: str, method: str, prompt: SoftPrompt, version: int = 1) -> TaskPrompt:
    return TaskPrompt(task_id, version, f"sha-{task_id}-{version}", method, prompt)


def request(
    ids: list[int], n_new: int, task_prompt: TaskPrompt | None = None, **params: Any
) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=list(ids), params=SamplingParams(max_new_tokens=n_new, **params), task=task_prompt
    )


def random_ids(n: int, seed: int, vocab: int = 1000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@torch.inference_mode()
def ref_peft_forward(peft_model: Any, ids: list[int], n_new: int) -> list[int]:
    """Greedy loop over PeftModel's own forward (it prepends the virtual tokens), no cache.

    Not PeftModel.generate: with peft 0.21.2 + transformers 5.24 its decode steps re-prepend the m virtual
    tokens to every new token (the cache grows by m + 1 per step), so only its first token is right.
    """
    seq = list(ids)
    for _ in range(n_new):
        x = torch.tensor([seq])  # [1, n + i]
        out = peft_model(input_ids=x, attention_mask=torch.ones_like(x))
        seq.append(int(out.logits[0, -1].argmax()))
    return seq[len(ids) :]
