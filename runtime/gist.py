"""Gist compression (Mu et al. 2023), the one implementation behind the server's POST /tasks/{id}/compress,
training's evaluation and `softserve-train compress`: run [instruction][k gists] once and keep the gist
positions' keys/values as a `gist` artifact whose input continues at n + k."""

from __future__ import annotations

import torch

from prompt_store import Artifact, SoftPrompt, ValidationError, make_artifact
from runtime.model_runner import KV, ModelRunner


def instruction_ids(runner: ModelRunner, instruction: str) -> list[int]:
    """The instruction as plain text with the tokenizer's own special tokens (e.g. BOS)."""
    return [int(i) for i in runner.tokenizer(instruction, add_special_tokens=True)["input_ids"]]


def gist_kv(runner: ModelRunner, ids: list[int], gists: torch.Tensor) -> KV:
    """Run [instruction ids][gists [k, d]] once (causal, positions 0..n+k-1) -> the gist positions' keys and
    values [L, Hkv, k, Dh] on the runner's device and dtype."""
    n = len(ids)
    with torch.inference_mode():
        tokens = runner.embed(torch.tensor(ids, dtype=torch.long, device=runner.device))  # [n, d]
        embeds = torch.cat([tokens, gists.detach().to(runner.device, runner.dtype)])  # [n + k, d]
        keys, values = runner.prefix_kv(SoftPrompt(embeds=embeds))  # [L, Hkv, n + k, Dh] each
    return keys[:, :, n:], values[:, :, n:]  # [L, Hkv, k, Dh] each


def compress(
    runner: ModelRunner,
    gist_embeddings: Artifact | torch.Tensor,
    instruction: str,
    task_id: str,
    keep: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Artifact:
    """Compress `instruction` into a `gist` artifact: gist KV [L, Hkv, k, Dh] (stored in `dtype`) and
    next_position = n + k. `gist_embeddings` is a `gist_embedding` artifact or its tensor [k, d]; `keep`
    keeps the instruction text in the manifest."""
    notes = ""
    if isinstance(gist_embeddings, Artifact):
        if gist_embeddings.manifest.method != "gist_embedding":
            raise ValidationError(
                f"task {gist_embeddings.task_id!r} is a {gist_embeddings.manifest.method!r} artifact, "
                "not gist_embedding",
                field="gist_task",
            )
        notes = f"from {gist_embeddings.task_id}"
        gists = gist_embeddings.tensors["gist_embeddings"]  # [k, d]
    else:
        gists = gist_embeddings  # [k, d]
    ids = instruction_ids(runner, instruction)
    n, k = len(ids), int(gists.shape[0])
    if n + k > runner.max_context:
        raise ValidationError(
            f"instruction has {n} tokens + {k} gists; the model context is {runner.max_context}",
            field="instruction",
        )
    keys, values = gist_kv(runner, ids, gists)  # [L, Hkv, k, Dh] each
    tensors = {
        "keys": keys.to(dtype).contiguous(),  # [L, Hkv, k, Dh]
        "values": values.to(dtype).contiguous(),  # [L, Hkv, k, Dh]
    }
    config = {"num_gist_tokens": k, "next_position": n + k, "instruction": instruction if keep else ""}
    return make_artifact(task_id, "gist", config, tensors, runner.fingerprint, notes=notes)
