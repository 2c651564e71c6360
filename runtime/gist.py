"""Gist compression (Mu et al. 2023), the one implementation behind the server's POST /tasks/{id}/compress,
training's evaluation and `softserve-train compress`: run [instruction][k gists] once and keep the gist
positions' keys/values as a `gist` artifact whose input continues at n + k.

Two ways to compress:
- a `gist_embedding` artifact: k learned gist embeddings through the frozen model (a task switch: the frozen
  model is not trained to put the instruction into the gists);
- a `gist_compressor` artifact: gist embeddings plus a LoRA adapter (PEFT) on the attention projections,
  trained so the frozen model attending to the gists' keys/values behaves as if it had read the instruction
  (training/methods/gist_compressor.py). The adapter runs on a *compressor view* of the model: a copy of
  its module tree that shares every weight tensor with the serving model (nothing copied, nothing
  written) and carries the LoRA layers. The serving model's modules are never touched, so a compress can
  run while the engine serves from the same weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from prompt_store import RAW_FORMAT, Artifact, SoftPrompt, ValidationError, make_artifact
from runtime.model_runner import KV, ModelRunner, layer_kv

GIST_METHOD = "gist_embedding"
COMPRESSOR_METHOD = "gist_compressor"


def instruction_ids(runner: ModelRunner, instruction: str) -> list[int]:
    """The instruction as plain text with the tokenizer's own special tokens (e.g. BOS)."""
    return [int(i) for i in runner.tokenizer(instruction, add_special_tokens=True)["input_ids"]]


def decoder_layers(model: Any) -> Any:
    """The decoder layers of an HF causal LM (`model.model.layers` for Llama-style models)."""
    return model.get_decoder().layers


def compressor_view(
    runner: ModelRunner, config: dict[str, Any], tensors: dict[str, torch.Tensor] | None
) -> Any:
    """The runner's model with a PEFT LoRA adapter injected into a weight-sharing copy of its module tree.

    config: a gist_compressor method_config (rank, alpha, target_modules). tensors: lora_A.<t> [L, r, d] and
    lora_B.<t> [L, out, r] (None: PEFT's initialisation, B = 0, for training). The base weights stay the
    runner's tensors (frozen); only the LoRA weights are the view's own.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:  # in the runtime lock; only a hand-made install can lack it
        raise ValidationError(
            "gist_compressor artifacts need the peft package on this server (pip install peft==0.21.2)",
            field="compressor",
        ) from None

    base = runner.model
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    view = copy.deepcopy(base, memo=shared)  # new modules, the same weight tensors
    targets = list(config["target_modules"])
    lora = LoraConfig(
        r=int(config["rank"]), lora_alpha=config["alpha"], target_modules=targets, lora_dropout=0.0
    )
    view = inject_adapter_in_model(lora, view)
    layers = decoder_layers(view)
    for t in targets:
        for i, layer in enumerate(layers):
            module = getattr(layer.self_attn, t)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # [r, d], [out, r]
            if tensors is None:
                continue
            want_a, want_b = tensors[f"lora_A.{t}"][i], tensors[f"lora_B.{t}"][i]  # [r, d], [out, r]
            if want_a.shape != a.shape or want_b.shape != b.shape:
                raise ValidationError(
                    f"compressor lora {t} of layer {i} has shapes {list(want_a.shape)}/{list(want_b.shape)}; "
                    f"this model needs {list(a.shape)}/{list(b.shape)}",
                    field="compressor",
                )
            with torch.no_grad():
                a.copy_(want_a.to(a.device, a.dtype))
                b.copy_(want_b.to(b.device, b.dtype))
    for name, p in view.named_parameters():
        p.requires_grad_("lora_" in name and tensors is None)
    return view.to(runner.device).eval()


def lora_tensors(view: Any, targets: list[str]) -> dict[str, torch.Tensor]:
    """The view's LoRA weights stacked per target: lora_A.<t> [L, r, d], lora_B.<t> [L, out, r]."""
    layers = decoder_layers(view)
    out = {}
    for t in targets:
        mods = [getattr(layer.self_attn, t) for layer in layers]
        out[f"lora_A.{t}"] = torch.stack([m.lora_A["default"].weight.detach().float() for m in mods])
        out[f"lora_B.{t}"] = torch.stack([m.lora_B["default"].weight.detach().float() for m in mods])
    return out


def gist_kv_forward(model: Any, runner: ModelRunner, ids: list[int], gists: torch.Tensor) -> KV:
    """[instruction ids][gists [k, d]] through `model` (the runner's model or a compressor view), causal,
    positions 0..n+k-1 -> the gist positions' keys and values [L, Hkv, k, Dh]. Gradients flow (training);
    `gist_kv` is the inference form."""
    n, k = len(ids), int(gists.shape[0])
    tokens = runner.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=runner.device))
    embeds = torch.cat([tokens, gists.to(runner.device, runner.dtype)])[None]  # [1, n + k, d]
    cache = runner.new_cache()
    model(
        inputs_embeds=embeds,  # [1, n + k, d]
        attention_mask=runner.attention_mask(
            torch.ones(1, n + k, dtype=torch.long, device=runner.device), n + k
        ),
        position_ids=torch.arange(n + k, device=runner.device)[None],  # [1, n + k]
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    layers = [layer_kv(cache, i) for i in range(len(cache.layers))]  # [1, Hkv, n + k, Dh] each
    keys = torch.stack([key[0, :, n:] for key, _ in layers])  # [L, Hkv, k, Dh]
    values = torch.stack([value[0, :, n:] for _, value in layers])  # [L, Hkv, k, Dh]
    return keys, values


def gist_kv(runner: ModelRunner, ids: list[int], gists: torch.Tensor, model: Any = None) -> KV:
    """Run [instruction ids][gists [k, d]] once (causal, positions 0..n+k-1) through `model` (default: the
    frozen model) -> the gist positions' keys and values [L, Hkv, k, Dh] on the runner's device and dtype."""
    with torch.inference_mode():
        if model is None:
            n = len(ids)
            tokens = runner.embed(torch.tensor(ids, dtype=torch.long, device=runner.device))  # [n, d]
            embeds = torch.cat([tokens, gists.detach().to(runner.device, runner.dtype)])  # [n + k, d]
            keys, values = runner.prefix_kv(SoftPrompt(embeds=embeds))  # [L, Hkv, n + k, Dh] each
            return keys[:, :, n:], values[:, :, n:]  # [L, Hkv, k, Dh] each
        return gist_kv_forward(model, runner, ids, gists.detach())


def _check_method(artifact: Artifact) -> None:
    if artifact.manifest.method not in (GIST_METHOD, COMPRESSOR_METHOD):
        field = "compressor" if artifact.manifest.method != GIST_METHOD else "gist_task"
        raise ValidationError(
            f"task {artifact.task_id!r} is a {artifact.manifest.method!r} artifact, not {GIST_METHOD} "
            f"or {COMPRESSOR_METHOD}",
            field=field,
        )


def compress(
    runner: ModelRunner,
    gist_embeddings: Artifact | torch.Tensor,
    instruction: str,
    task_id: str,
    keep: bool = True,
    dtype: torch.dtype = torch.float32,
    view: Any = None,
) -> Artifact:
    """Compress `instruction` into a `gist` artifact: gist KV [L, Hkv, k, Dh] (stored in `dtype`) and
    next_position = n + k. `gist_embeddings` is a `gist_embedding` or `gist_compressor` artifact, or a
    tensor [k, d]; a compressor runs its LoRA adapter (on a compressor view, built here unless `view` is
    given) for this call only. `keep` keeps the instruction text in the manifest. The gist task reads its
    input in the format the gists were trained with (the source artifact's `input_format`; raw for a
    tensor)."""
    notes = ""
    input_format = RAW_FORMAT
    if isinstance(gist_embeddings, Artifact):
        input_format = gist_embeddings.manifest.input_format
        _check_method(gist_embeddings)
        notes = f"from {gist_embeddings.task_id}"
        gists = gist_embeddings.tensors["gist_embeddings"]  # [k, d]
        if gist_embeddings.manifest.method == COMPRESSOR_METHOD:
            notes = f"compressed by {gist_embeddings.task_id} v{gist_embeddings.version}"
            if view is None:
                view = compressor_view(
                    runner, gist_embeddings.manifest.method_config, gist_embeddings.tensors
                )
    else:
        gists = gist_embeddings  # [k, d]
    ids = instruction_ids(runner, instruction)
    n, k = len(ids), int(gists.shape[0])
    if n + k > runner.max_context:
        raise ValidationError(
            f"instruction has {n} tokens + {k} gists; the model context is {runner.max_context}",
            field="instruction",
        )
    keys, values = gist_kv(runner, ids, gists, model=view)  # [L, Hkv, k, Dh] each
    tensors = {
        "keys": keys.to(dtype).contiguous(),  # [L, Hkv, k, Dh]
        "values": values.to(dtype).contiguous(),  # [L, Hkv, k, Dh]
    }
    config = {"num_gist_tokens": k, "next_position": n + k, "instruction": instruction if keep else ""}
    return make_artifact(
        task_id, "gist", config, tensors, runner.fingerprint, notes=notes, input_format=input_format
    )
