"""Automatic prefix caching of prompt tokens: KV of fixed-size token blocks, found by a hash chain.

A row's prompt (the tokens after its soft prompt) is cut into blocks of BLOCK tokens. Block i's id is
sha256(id of block i-1, its token ids), and the chain starts at the row's *root*: the task version key
(task, version, artifact sha256, which also fixes the ACCEPT delta) or "bare". So a block is reused only by a
row of the same task version, with the same soft prompt, delta and every earlier prompt token; a new version
never hits an old version's blocks. Only full blocks are cached, and the last prompt token is always
computed (its logits are the first token's).

Blocks live on the model's device in a byte-bounded LRU (`prompt_store.lru.ByteLRU`). A hit is copied into
the row's KV slot at admission (with its soft prompt's KV: they become the row's prefix), so a running row
never reads a cached block afterwards, and evicting one, even during an admission that holds it, changes no
result: the admission keeps its own references.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from prompt_store.lru import ByteLRU
from runtime.batch_state import Prefilled, PrefillItem
from runtime.model_runner import layer_kv

BLOCK = 16  # tokens per cached block
BlockId = bytes


@dataclass(frozen=True)
class Block:
    keys: torch.Tensor  # [L, Hkv, BLOCK, Dh]
    values: torch.Tensor  # [L, Hkv, BLOCK, Dh]

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def root_id(task_key: tuple[str, int, str] | None) -> BlockId:
    """The chain's root: one task version (or the bare model)."""
    text = "bare" if task_key is None else f"task\x00{task_key[0]}\x00{task_key[1]}\x00{task_key[2]}"
    return hashlib.sha256(text.encode()).digest()


def block_ids(root: BlockId, ids: list[int], blocks: int) -> list[BlockId]:
    """Ids of the first `blocks` full blocks of `ids` under `root`."""
    out: list[BlockId] = []
    parent = root
    for b in range(blocks):
        chunk = ids[b * BLOCK : (b + 1) * BLOCK]
        parent = hashlib.sha256(parent + b"".join(t.to_bytes(4, "little") for t in chunk)).digest()
        out.append(parent)
    return out


@dataclass
class Lookup:
    """What the cache holds for one row: the block ids of its full prompt blocks, and the hits (a prefix)."""

    chain: list[BlockId]
    hits: list[Block] = field(default_factory=list)

    @property
    def cached_tokens(self) -> int:
        return len(self.hits) * BLOCK


class PromptCache:
    """KV blocks of prompt tokens by chain id, bounded by `max_bytes` (0 turns the cache off)."""

    def __init__(self, max_bytes: int) -> None:
        self.blocks: ByteLRU[BlockId, Block] = ByteLRU(max(max_bytes, 0))
        self.enabled = max_bytes > 0
        self.hit_tokens = 0
        self.miss_tokens = 0

    def lookup(self, root: BlockId, ids: list[int]) -> Lookup:
        """The longest cached prefix of `ids` (whole blocks, never the last token)."""
        if not self.enabled:
            return Lookup([])
        chain = block_ids(root, ids, len(ids) // BLOCK)
        found = Lookup(chain)
        for block_id in chain[: (len(ids) - 1) // BLOCK]:
            block = self.blocks.get(block_id)
            if block is None:
                break
            found.hits.append(block)
        self.hit_tokens += found.cached_tokens
        self.miss_tokens += len(ids) - found.cached_tokens
        return found

    def extend(self, item: PrefillItem, found: Lookup) -> PrefillItem:
        """The row with its cached blocks moved into its prefix: KV prefix + hits, the prompt after them
        (continuing c positions later), and the ACCEPT delta's rows that fall on that remaining prompt."""
        c = found.cached_tokens
        if c == 0:
            return item
        keys = torch.cat([item.keys] + [b.keys for b in found.hits], dim=2)  # [L, Hkv, m + c, Dh]
        values = torch.cat([item.values] + [b.values for b in found.hits], dim=2)  # [L, Hkv, m + c, Dh]
        added, at = item.added, item.added_at - c  # the delta's rows on the cached tokens are spent
        if added is not None and at < 0:
            added = added[-at:] if added.shape[0] > -at else None  # [s - (c - added_at), d]
        return PrefillItem(keys, values, item.next_position + c, item.ids[c:], added, max(0, at))

    def insert_prefilled(self, new: Prefilled, g: int, found: Lookup) -> None:
        """Cache row g's full prompt blocks that its prefill computed (the ones after its hits). The row's
        prompt after the hits sits in the last `prompt_lens[g]` columns of the prefill's cache."""
        if not self.enabled:
            return
        layers = [layer_kv(new.cache, i) for i in range(len(new.cache.layers))]  # [G, Hkv, T, Dh] each
        start = int(layers[0][0].shape[2]) - new.prompt_lens[g] - found.cached_tokens  # column of token 0
        for b in range(len(found.hits), len(found.chain)):
            block_id = found.chain[b]
            if block_id in self.blocks:
                self.blocks.get(block_id)  # most recently used
                continue
            cols = slice(start + b * BLOCK, start + (b + 1) * BLOCK)
            keys = torch.stack([k[g, :, cols] for k, _ in layers])  # [L, Hkv, BLOCK, Dh] (a copy)
            values = torch.stack([v[g, :, cols] for _, v in layers])  # [L, Hkv, BLOCK, Dh] (a copy)
            block = Block(keys, values)
            if block.nbytes() <= self.blocks.max_bytes:
                self.blocks.put(block_id, block, block.nbytes())

    def stats(self) -> dict[str, int | float]:
        total = self.hit_tokens + self.miss_tokens
        return {
            "prompt_cache_hit_tokens": self.hit_tokens,
            "prompt_cache_miss_tokens": self.miss_tokens,
            "prompt_cache_hit_rate": self.hit_tokens / total if total else 0.0,
            "prompt_cache_bytes": self.blocks.bytes,
            "prompt_cache_blocks": len(self.blocks),
            "prompt_cache_evictions": self.blocks.evictions,
        }
