"""Soft-prompt artifacts for a served model (built against its fingerprint) and their upload over HTTP."""

from __future__ import annotations

import gc

import httpx
import torch

from prompt_store import Artifact, Fingerprint, SoftPrompt, make_artifact, to_bytes
from runtime.model_runner import ModelRunner, load_model

GIST_INSTRUCTION = "Answer in one short sentence, in French."


def vocab_token_ids(m: int, seed: int, vocab_size: int = 10_000) -> torch.Tensor:
    """m seeded random token ids [m] in 100..min(10_000, vocab_size) (a vocabulary-initialised prompt)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(10_000, vocab_size), (m,), generator=g)


def vocab_embeds(runner: ModelRunner, m: int, seed: int) -> torch.Tensor:
    """m input embeddings of random vocabulary tokens [m, d] (a vocab-initialised soft prompt)."""
    return runner.embed(vocab_token_ids(m, seed)).float().cpu()  # [m, d]


def text_embeds(runner: ModelRunner, text: str) -> torch.Tensor:
    ids = torch.tensor(runner.tokenizer(text)["input_ids"])
    return runner.embed(ids).float().cpu()  # [n, d]


def upload(client: httpx.Client, base_url: str, task_id: str, data: bytes) -> httpx.Response:
    """PUT /tasks/{task_id} with the artifact bytes as the multipart file (201 on success)."""
    files = {"file": (f"{task_id}.safetensors", data, "application/octet-stream")}
    return client.put(f"{base_url}/tasks/{task_id}", files=files)


class PromptTuningMaker:
    """Prompt-tuning artifacts for the served model: embeddings of random vocabulary tokens. Keeps only the
    fingerprint and the input embedding table of the model it loads on the CPU."""

    def __init__(self, model: str | None) -> None:
        runner = load_model(model, dtype="float32", device="cpu")
        self.fingerprint: Fingerprint = runner.fingerprint
        self.weight = runner.model.get_input_embeddings().weight.detach().float().clone()  # [V, d]
        del runner
        gc.collect()

    def make(self, task_id: str, m: int, seed: int) -> bytes:
        prompt = self.weight[vocab_token_ids(m, seed, self.weight.shape[0])].clone()  # [m, d]
        art = make_artifact(
            task_id, "prompt_tuning", {"num_virtual_tokens": m}, {"prompt": prompt}, self.fingerprint
        )
        return to_bytes(art)


@torch.inference_mode()
def mixed_artifacts(runner: ModelRunner) -> list[Artifact]:
    """11 artifacts over five methods with different prefix lengths, valid for `runner`'s fingerprint."""
    fp, d = runner.fingerprint, runner.hidden_size
    out: list[Artifact] = []
    for i, m in enumerate((8, 16, 32)):
        cfg = {"num_virtual_tokens": m, "init": "vocab"}
        out.append(
            make_artifact(f"load-pt-{i}", "prompt_tuning", cfg, {"prompt": vocab_embeds(runner, m, i)}, fp)
        )
    for i, m in enumerate((10, 20)):
        cfg = {"num_virtual_tokens": m, "encoder_type": "mlp"}
        prompt = vocab_embeds(runner, m, 10 + i)
        out.append(make_artifact(f"load-ptune-{i}", "p_tuning", cfg, {"prompt": prompt}, fp))
    for i, m in enumerate((8, 24)):
        keys, values = runner.prefix_kv(SoftPrompt(embeds=vocab_embeds(runner, m, 20 + i)))  # [L, Hkv, m, Dh]
        tensors = {"keys": keys.float().cpu(), "values": values.float().cpu()}
        out.append(make_artifact(f"load-prefix-{i}", "prefix_tuning", {"num_virtual_tokens": m}, tensors, fp))
    k_sub = 8  # subspaces; d / k_sub must be whole
    for i, m in enumerate((8, 16)):
        # identity mixing weights over m codewords per subspace: the composed prompt is the m embeddings
        emb = vocab_embeds(runner, m, 30 + i)  # [m, d]
        weight = torch.eye(m)[:, None, :].expand(m, k_sub, m).contiguous()  # [m, K, r=m]
        codebook = emb.reshape(m, k_sub, d // k_sub).transpose(0, 1).contiguous()  # [K, r=m, d/K]
        g = torch.Generator().manual_seed(40 + i)
        tensors = {
            "prompt_weight": weight,
            "prompt_codebook": codebook,
            "added_weight": torch.randn(4, 4, 2, generator=g) * 0.1,  # [s, Ka, ra]
            "added_codebook": torch.randn(4, 2, d // 4, generator=g) * 0.01,  # [Ka, ra, d/Ka]
        }
        cfg = {
            "num_virtual_tokens": m,
            "num_subspaces": k_sub,
            "num_codewords": m,
            "added_length": 4,
            "added_subspaces": 4,
            "added_codewords": 2,
        }
        out.append(make_artifact(f"load-accept-{i}", "accept", cfg, tensors, fp))
    # gist: the KV of the last k positions of an instruction, next position after it
    instruction = text_embeds(runner, GIST_INSTRUCTION)  # [n, d]
    keys, values = runner.prefix_kv(SoftPrompt(embeds=instruction))  # [L, Hkv, n, Dh]
    n = instruction.shape[0]
    for i, k in enumerate((2, 4)):
        tensors = {"keys": keys[:, :, -k:].float().cpu(), "values": values[:, :, -k:].float().cpu()}
        cfg = {"num_gist_tokens": k, "next_position": n}
        out.append(make_artifact(f"load-gist-{i}", "gist", cfg, tensors, fp))
    # learned gist tokens for the server-side compression (not served themselves)
    gists = vocab_embeds(runner, 2, 50)  # [k, d]
    out.append(
        make_artifact(
            "load-gist-tokens", "gist_embedding", {"num_gist_tokens": 2}, {"gist_embeddings": gists}, fp
        )
    )
    return out
