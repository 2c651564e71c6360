"""Server side of gist tokens: compress an instruction into a `gist` artifact with stored gist embeddings."""

from __future__ import annotations

import torch

from prompt_store import Artifact, SoftPrompt, ValidationError, make_artifact
from runtime.model_runner import ModelRunner


def instruction_ids(runner: ModelRunner, instruction: str) -> list[int]:
    """The instruction as plain text with the tokenizer's own special tokens (as the gist trainer does)."""
    return [int(i) for i in runner.tokenizer(instruction, add_special_tokens=True)["input_ids"]]


def compress(
    runner: ModelRunner, gist_embeddings: Artifact, instruction: str, task_id: str, keep: bool
) -> Artifact:
    """Run [instruction][k gists] once; keep the gist positions' keys/values; the input continues at n + k."""
    if gist_embeddings.manifest.method != "gist_embedding":
        raise ValidationError(
            f"task {gist_embeddings.task_id!r} is a {gist_embeddings.manifest.method!r} artifact, "
            "not gist_embedding",
            field="gist_task",
        )
    ids = instruction_ids(runner, instruction)
    gists = gist_embeddings.tensors["gist_embeddings"].to(runner.device, runner.dtype)  # [k, d]
    n, k = len(ids), int(gists.shape[0])
    if n + k > runner.max_context:
        raise ValidationError(
            f"instruction has {n} tokens + {k} gists; the model context is {runner.max_context}",
            field="instruction",
        )
    with torch.inference_mode():
        tokens = runner.embed(torch.tensor(ids, device=runner.device))  # [n, d]
        keys, values = runner.prefix_kv(SoftPrompt(embeds=torch.cat([tokens, gists], 0)))  # [L, Hkv, n+k, Dh]
    tensors = {
        "keys": keys[:, :, n:].to(torch.float32).contiguous(),  # [L, Hkv, k, Dh]
        "values": values[:, :, n:].to(torch.float32).contiguous(),  # [L, Hkv, k, Dh]
    }
    config = {"num_gist_tokens": k, "next_position": n + k, "instruction": instruction if keep else ""}
    return make_artifact(
        task_id, "gist", config, tensors, runner.fingerprint, notes=f"from {gist_embeddings.task_id}"
    )
