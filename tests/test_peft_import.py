"""PEFT import: adapters made by real peft on tiny Llama (GQA) and GPT-2 (no GQA) convert exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from prompt_store import (
    ArtifactFormatError,
    Fingerprint,
    InvalidTaskId,
    TooLarge,
    UnsupportedAdapter,
    ValidationError,
    from_bytes,
    to_bytes,
    to_serving_form,
)
from prompt_store.peft_import import CONFIG_NAME, WEIGHTS_NAME, import_peft_adapter, import_peft_files

M = 3  # virtual tokens


def tiny_gpt2():  # type: ignore[no-untyped-def]
    """hidden 64, 2 layers, 4 heads (no GQA), deterministic weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


MODELS: dict[str, Callable[[], Any]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CONFIGS: dict[str, Callable[[], Any]] = {
    "prompt": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=M),
    "p_mlp": lambda: PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=M, encoder_hidden_size=16
    ),
    "p_lstm": lambda: PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=M,
        encoder_reparameterization_type="LSTM",
        encoder_hidden_size=16,
    ),
    "prefix": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=M),
    "prefix_proj": lambda: PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=M, prefix_projection=True, encoder_hidden_size=16
    ),
}


@dataclasses.dataclass
class Adapter:
    path: Path
    peft_model: Any
    base: Fingerprint

    def files(self, **config_changes: Any) -> dict[str, bytes]:
        """The saved files as an upload, with adapter_config.json entries replaced (None removes one)."""
        config = json.loads((self.path / CONFIG_NAME).read_text())
        config.update(config_changes)
        config = {k: v for k, v in config.items() if v is not None}
        return {
            CONFIG_NAME: json.dumps(config).encode(),
            WEIGHTS_NAME: (self.path / WEIGHTS_NAME).read_bytes(),
        }

    def saved_embeddings(self) -> torch.Tensor:
        return load_file(self.path / WEIGHTS_NAME)["prompt_embeddings"]


@pytest.fixture(scope="session")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Adapter]:
    """adapter(model, kind): a PEFT adapter saved with save_pretrained (built once per test session)."""
    cache: dict[tuple[str, str], Adapter] = {}

    def make(model_name: str, kind: str) -> Adapter:
        if (model_name, kind) not in cache:
            model = MODELS[model_name]()
            base = Fingerprint.from_model(model, f"tiny-{model_name}")
            torch.manual_seed(1)
            peft_model = get_peft_model(model, CONFIGS[kind]())
            path = tmp_path_factory.mktemp(f"{model_name}-{kind}")
            peft_model.save_pretrained(path)
            cache[model_name, kind] = Adapter(path, peft_model, base)
        return cache[model_name, kind]

    return make


# ---- exact conversions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", ["prompt", "p_mlp", "p_lstm"])
def test_prompt_methods_convert_exactly(model_name: str, kind: str, adapter: Callable[..., Adapter]) -> None:
    a = adapter(model_name, kind)
    art = import_peft_adapter(a.path, "imported", a.base)
    assert art.manifest.method == ("prompt_tuning" if kind == "prompt" else "p_tuning")
    saved = a.saved_embeddings()  # [m, d]
    assert saved.shape == (M, a.base.hidden_size)
    assert torch.equal(art.tensors["prompt"], saved)
    # ... which is exactly what PEFT prepends to the input embeddings (grad mode on, as in save_pretrained:
    # torch's no-grad LSTM kernel differs from it in the last bits)
    peft_prompt = a.peft_model.get_prompt(batch_size=1)[0].detach()  # [m, d]
    assert torch.equal(art.tensors["prompt"], peft_prompt)
    sp = to_serving_form(art)
    assert sp.embeds is not None and torch.equal(sp.embeds, saved) and sp.next_position == M
    if kind != "prompt":
        assert art.manifest.method_config == {
            "num_virtual_tokens": M,
            "encoder_type": "lstm" if kind == "p_lstm" else "mlp",
            "encoder_hidden_size": 16,
        }


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", ["prefix", "prefix_proj"])
def test_prefix_converts_exactly_to_peft_past_key_values(
    model_name: str, kind: str, adapter: Callable[..., Adapter]
) -> None:
    a = adapter(model_name, kind)
    base = a.base
    art = import_peft_adapter(a.path / CONFIG_NAME, "imported", base)
    assert art.manifest.method == "prefix_tuning"
    assert art.manifest.method_config == {"num_virtual_tokens": M, "projection": kind == "prefix_proj"}
    keys, values = art.tensors["keys"], art.tensors["values"]  # [L, Hkv, m, Dh]
    assert keys.shape == values.shape == (base.num_layers, base.num_kv_heads, M, base.head_dim)
    with torch.no_grad():
        cache = a.peft_model.get_prompt(batch_size=1)  # DynamicCache, layers[l].keys [1, Hkv, m, Dh]
    assert len(cache.layers) == base.num_layers
    for layer in range(base.num_layers):
        assert torch.equal(keys[layer], cache.layers[layer].keys[0])
        assert torch.equal(values[layer], cache.layers[layer].values[0])
    sp = to_serving_form(art)
    assert sp.next_position == M and sp.keys is not None and torch.equal(sp.keys, keys)


def test_gqa_prefix_uses_kv_heads(adapter: Callable[..., Adapter]) -> None:
    a = adapter("llama", "prefix")
    config = json.loads((a.path / CONFIG_NAME).read_text())
    assert (config["num_attention_heads"], config["token_dim"]) == (2, 32)  # Hkv and Hkv*Dh, not 4 and 64
    assert a.saved_embeddings().shape == (M, 2 * 2 * 2 * 16)  # [m, 2*L*Hkv*Dh]


def test_upload_equals_directory_import_and_round_trips(adapter: Callable[..., Adapter]) -> None:
    a = adapter("llama", "prefix_proj")
    from_dir = import_peft_adapter(a.path, "imported", a.base)
    uploaded = import_peft_files({**a.files(), "README.md": b"# hi"}, "imported", a.base)
    assert from_dir.sha256 == uploaded.sha256
    again = from_bytes(to_bytes(uploaded))
    assert again.manifest == uploaded.manifest and "PREFIX_TUNING" in again.manifest.notes


# ---- refusals ---------------------------------------------------------------------------------------------


def test_lora_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    base = Fingerprint.from_model(model, "tiny-llama")
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj", "v_proj"])
    get_peft_model(model, lora).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedAdapter) as info:
        import_peft_adapter(tmp_path, "lora-task", base)
    assert "LORA" in str(info.value) and "PREFIX_TUNING" in str(info.value)
    assert info.value.field == "peft_type"


@pytest.mark.parametrize(
    "peft_type", ["IA3", "LOHA", "ADAPTION_PROMPT", "MULTITASK_PROMPT_TUNING", "", None, 7]
)
def test_other_types_refused(
    peft_type: Any, adapter: Callable[..., Adapter], tiny_fingerprint: Fingerprint
) -> None:
    files = adapter("llama", "prompt").files(peft_type=peft_type)
    with pytest.raises(UnsupportedAdapter) as info:
        import_peft_files(files, "task-x", tiny_fingerprint)
    assert "PROMPT_TUNING" in str(info.value)


def test_bin_adapter_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    base = Fingerprint.from_model(model, "tiny-llama")
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=M))
    peft_model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / WEIGHTS_NAME).exists()
    with pytest.raises(UnsupportedAdapter) as info:
        import_peft_adapter(tmp_path, "task-x", base)
    assert "adapter_model.bin" in str(info.value) and "safe_serialization=True" in str(info.value)


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def test_malicious_bin_upload_never_unpickled(
    tmp_path: Path, adapter: Callable[..., Adapter], tiny_fingerprint: Fingerprint
) -> None:
    marker = tmp_path / "pwned"
    files = adapter("llama", "prompt").files()
    evil = pickle.dumps({"prompt_embeddings": _Touch(marker)})
    for upload in ({CONFIG_NAME: files[CONFIG_NAME], "adapter_model.bin": evil}, {**files, "x.pt": evil}):
        with pytest.raises(UnsupportedAdapter):
            import_peft_files(upload, "task-x", tiny_fingerprint)
    with pytest.raises(ArtifactFormatError):  # pickle bytes under the safetensors name
        import_peft_files({**files, WEIGHTS_NAME: evil}, "task-x", tiny_fingerprint)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("kind", "changes", "field"),
    [
        ("prompt", {"hidden_size": 128}, "token_dim"),
        ("prompt", {"num_layers": 3}, "num_layers"),
        ("prefix", {"num_layers": 3}, "num_layers"),
        ("prefix", {"num_kv_heads": 4}, "num_attention_heads"),
        ("prefix", {"head_dim": 8}, "token_dim"),
    ],
)
def test_base_mismatch_names_the_field(
    kind: str, changes: dict[str, Any], field: str, adapter: Callable[..., Adapter]
) -> None:
    a = adapter("llama", kind)
    with pytest.raises(ValidationError) as info:
        import_peft_adapter(a.path, "task-x", dataclasses.replace(a.base, **changes))
    assert info.value.field == field and field in str(info.value)


@pytest.mark.parametrize(
    ("kind", "changes", "exc", "field"),
    [
        # PEFT before GQA support (#1901) stored all attention heads: does not fit a GQA model's KV cache
        ("prefix", {"num_attention_heads": 4, "token_dim": 64}, ValidationError, "num_attention_heads"),
        ("prefix", {"num_transformer_submodules": 2}, UnsupportedAdapter, "num_transformer_submodules"),
        ("prompt", {"task_type": "SEQ_2_SEQ_LM"}, UnsupportedAdapter, "task_type"),
        ("prompt", {"num_virtual_tokens": M + 1}, ValidationError, "prompt_embeddings"),
        ("prompt", {"num_virtual_tokens": 5000}, TooLarge, "num_virtual_tokens"),
        ("prompt", {"num_virtual_tokens": None}, ValidationError, "num_virtual_tokens"),
        ("prefix", {"token_dim": None}, ValidationError, "token_dim"),
        (
            "p_mlp",
            {"encoder_reparameterization_type": "GRU"},
            ValidationError,
            "encoder_reparameterization_type",
        ),
    ],
)
def test_bad_config_refused(
    kind: str, changes: dict[str, Any], exc: type[Exception], field: str, adapter: Callable[..., Adapter]
) -> None:
    a = adapter("llama", kind)
    with pytest.raises(exc) as info:
        import_peft_files(a.files(**changes), "task-x", a.base)
    assert type(info.value) is exc and getattr(info.value, "field", None) == field


@pytest.mark.parametrize("config", [b"not json", b"[1, 2]", b"[" * 50_000, b"{" + b" " * 70_000 + b"}"])
def test_bad_config_file_refused(config: bytes, adapter: Callable[..., Adapter]) -> None:
    a = adapter("llama", "prompt")
    with pytest.raises((ArtifactFormatError, TooLarge)):
        import_peft_files({**a.files(), CONFIG_NAME: config}, "task-x", a.base)


@pytest.mark.parametrize(
    "tensors",
    [
        {"prompt_embeddings": torch.full((M, 64), float("nan"))},
        {"prompt_embeddings": torch.zeros(M, 64), "extra": torch.zeros(2)},
        {"other": torch.zeros(M, 64)},
        {"prompt_embeddings": torch.zeros(M, 64, dtype=torch.float64)},
        {"prompt_embeddings": torch.zeros(M * 64)},
    ],
    ids=["nan", "extra", "renamed", "float64", "1-d"],
)
def test_bad_weights_refused(tensors: dict[str, torch.Tensor], adapter: Callable[..., Adapter]) -> None:
    a = adapter("llama", "prompt")
    files = {**a.files(), WEIGHTS_NAME: bytes(st_save(tensors, metadata={"format": "pt"}))}
    with pytest.raises((ValidationError, ArtifactFormatError)):
        import_peft_files(files, "task-x", a.base)


def test_missing_files_and_bad_task_id(tmp_path: Path, adapter: Callable[..., Adapter]) -> None:
    a = adapter("llama", "prompt")
    with pytest.raises(ArtifactFormatError):
        import_peft_files({CONFIG_NAME: a.files()[CONFIG_NAME]}, "task-x", a.base)
    with pytest.raises(ArtifactFormatError):
        import_peft_adapter(tmp_path / "nowhere", "task-x", a.base)
    with pytest.raises(InvalidTaskId):
        import_peft_adapter(tmp_path / "nowhere", "../etc", a.base)
    with pytest.raises(InvalidTaskId):
        import_peft_files(a.files(), "Bad Id", a.base)


def test_peft_reload_matches_import(adapter: Callable[..., Adapter]) -> None:
    """An adapter reloaded by PEFT (inference mode: stored prefix used as is) gives the same KV prefix."""
    a = adapter("llama", "prefix_proj")
    reloaded = PeftModel.from_pretrained(tiny_llama(), a.path)
    art = import_peft_adapter(a.path, "imported", a.base)
    with torch.no_grad():
        cache: Any = reloaded.get_prompt(batch_size=1)  # DynamicCache
    for layer in range(a.base.num_layers):
        assert torch.equal(art.tensors["keys"][layer], cache.layers[layer].keys[0])
        assert torch.equal(art.tensors["values"][layer], cache.layers[layer].values[0])
