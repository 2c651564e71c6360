"""Core value types of the contract: base-model fingerprint, limits, manifest, artifact, serving form."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from prompt_store.errors import ArtifactFormatError

FORMAT_VERSION = 2  # 2: the manifest records `input_format`
READ_FORMAT_VERSIONS = (1, 2)  # a version-1 manifest reads as RAW_FORMAT (how the server ran every task then)
ADDED_AT_START = "start"  # an ACCEPT delta on the request's first tokens (artifacts without `added_at`)
ADDED_AT_USER_TEXT = "user_text"  # on the first tokens of the user's text, after the chat template's head
SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in SUPPORTED_DTYPES.items():
        if dt == dtype:
            return name
    raise ArtifactFormatError(f"dtype {dtype} is not supported (use one of {sorted(SUPPORTED_DTYPES)})")


def embedding_hash(weight: torch.Tensor) -> str:
    """Hash of the input-embedding matrix, rounded to bfloat16 so fp32/bf16 loads of one model agree."""
    as_bf16 = weight.detach().to("cpu", torch.bfloat16).contiguous()  # [V, d]
    return hashlib.sha256(as_bf16.view(torch.int16).numpy().tobytes()).hexdigest()[:32]


@dataclass(frozen=True)
class Fingerprint:
    """What an artifact must agree with to run on a base model."""

    name: str
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    embedding_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        """Strict: sizes are non-negative integers (never floats, bools or strings), names are strings."""
        ints: dict[str, int] = {}
        for key in ("hidden_size", "num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise ArtifactFormatError(
                    f"manifest.base_model.{key} must be a non-negative integer, got {repr(value)[:40]}",
                    field=f"base_model.{key}",
                )
            ints[key] = value
        texts: dict[str, str] = {}
        for key in ("name", "embedding_hash"):
            value = data.get(key, "")
            if not isinstance(value, str):
                raise ArtifactFormatError(
                    f"manifest.base_model.{key} must be a string, got {repr(value)[:40]}",
                    field=f"base_model.{key}",
                )
            texts[key] = value
        return cls(
            name=texts["name"],
            hidden_size=ints["hidden_size"],
            num_layers=ints["num_layers"],
            num_kv_heads=ints["num_kv_heads"],
            head_dim=ints["head_dim"],
            vocab_size=ints["vocab_size"],
            embedding_hash=texts["embedding_hash"],
        )

    @classmethod
    def from_model(cls, model: Any, name: str) -> Fingerprint:
        """Fingerprint of a loaded Hugging Face causal LM (duck-typed: needs `.config` and embeddings)."""
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        hidden = int(text_cfg.hidden_size)
        heads = int(text_cfg.num_attention_heads)
        kv_heads = int(getattr(text_cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text_cfg, "head_dim", None) or hidden // heads)
        return cls(
            name=name,
            hidden_size=hidden,
            num_layers=int(text_cfg.num_hidden_layers),
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(text_cfg.vocab_size),
            embedding_hash=embedding_hash(model.get_input_embeddings().weight),
        )

    def mismatches(self, other: Fingerprint) -> list[str]:
        """Human-readable differences that make an artifact for `other` unusable on `self`."""
        out = []
        for key in ("hidden_size", "num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                out.append(f"{key}: artifact has {theirs}, base model has {mine}")
        if self.embedding_hash and other.embedding_hash and self.embedding_hash != other.embedding_hash:
            out.append("embedding_hash differs: the artifact was trained on different base-model weights")
        return out


@dataclass(frozen=True)
class Limits:
    """Size limits applied to every artifact before it is accepted."""

    max_file_bytes: int = 256 * 1024 * 1024
    max_header_bytes: int = 1024 * 1024
    max_virtual_tokens: int = 1024
    max_tensors: int = 16
    max_manifest_chars: int = 64 * 1024


@dataclass(frozen=True)
class InputFormat:
    """How the task's training turned a request's text into tokens; the server applies the same to a plain
    `prompt` (server.service.tokenize).

    chat_template: False -> the text as is (the tokenizer's own special tokens, e.g. BOS); True -> the text
        is the user turn of the tokenizer's chat template, with the generation prompt.
    system_prompt: with chat_template only: the system message's exact text, or None for no system message
        (the template's own default, e.g. SmolLM2's "You are a helpful AI assistant named SmolLM...").
    """

    chat_template: bool = False
    system_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"chat_template": self.chat_template, "system_prompt": self.system_prompt}

    @classmethod
    def from_dict(cls, data: Any) -> InputFormat:
        """Strict: an object with exactly `chat_template` (bool) and `system_prompt` (string or null, and a
        string only with chat_template true)."""
        if not isinstance(data, dict):
            raise ArtifactFormatError(
                "manifest.input_format must be an object {chat_template, system_prompt}", field="input_format"
            )
        unknown = sorted(set(data) - {"chat_template", "system_prompt"})
        if unknown:
            raise ArtifactFormatError(
                f"manifest.input_format has unknown keys {unknown} (it takes chat_template, system_prompt)",
                field="input_format",
            )
        chat = data.get("chat_template")
        if not isinstance(chat, bool):
            raise ArtifactFormatError(
                f"manifest.input_format.chat_template must be true or false, got {repr(chat)[:40]}",
                field="input_format.chat_template",
            )
        system = data.get("system_prompt")
        if system is not None and not isinstance(system, str):
            raise ArtifactFormatError(
                f"manifest.input_format.system_prompt must be a string or null, got {repr(system)[:40]}",
                field="input_format.system_prompt",
            )
        if system is not None and not chat:
            raise ArtifactFormatError(
                "manifest.input_format.system_prompt needs chat_template true (raw text has no system turn)",
                field="input_format.system_prompt",
            )
        return cls(chat_template=chat, system_prompt=system)


RAW_FORMAT = InputFormat()  # the text as is: PEFT imports, hand-made artifacts, every version-1 artifact


@dataclass(frozen=True)
class Manifest:
    """JSON manifest stored in the safetensors metadata of an artifact (see DESIGN.md)."""

    task_id: str
    method: str
    method_config: dict[str, Any]
    base_model: Fingerprint
    dtype: str
    sha256: str = ""
    version: int = 0
    created_at: str = ""
    notes: str = ""
    format_version: int = FORMAT_VERSION
    input_format: InputFormat = RAW_FORMAT

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["base_model"] = self.base_model.to_dict()
        data["input_format"] = self.input_format.to_dict()
        return data


@dataclass(frozen=True)
class Artifact:
    """A manifest plus the trained tensors (on CPU)."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def task_id(self) -> str:
        return self.manifest.task_id

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class SoftPrompt:
    """Serving form of an artifact.

    embeds: embedding prefix [m, d] (the server turns it into a KV prefix once per version)
    keys/values: KV prefix [L, Hkv, m, Dh] each
    next_position: position id of the first real input token
    added: delta [s, d] added to the embeddings of the first s real input tokens
    added_at: where the delta starts: ADDED_AT_START (the request's first tokens; artifacts written before
        this field) or ADDED_AT_USER_TEXT (the first tokens of the user's text, after the chat template's
        head: `runtime.input_format.user_text_offset`)
    """

    embeds: torch.Tensor | None = None  # [m, d]
    keys: torch.Tensor | None = None  # [L, Hkv, m, Dh]
    values: torch.Tensor | None = None  # [L, Hkv, m, Dh]
    next_position: int = 0
    added: torch.Tensor | None = None  # [s, d]
    added_at: str = "start"

    @property
    def num_virtual_tokens(self) -> int:
        """Prefix length m (rows of the KV prefix or the embedding prefix)."""
        if self.keys is not None:
            return int(self.keys.shape[2])
        if self.embeds is not None:
            return int(self.embeds.shape[0])
        return 0

    def nbytes(self) -> int:
        parts = (self.embeds, self.keys, self.values, self.added)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> SoftPrompt:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return SoftPrompt(
            embeds=move(self.embeds),
            keys=move(self.keys),
            values=move(self.values),
            next_position=self.next_position,
            added=move(self.added),
            added_at=self.added_at,
        )


TaskKey = tuple[str, int, str]  # (task_id, version, sha256): one task version, in every cache


@dataclass(frozen=True)
class TaskPrompt:
    """One task version's serving form and its identity: what the serving cache holds, a `Lease` pins, a
    request carries and the engine turns into a device prefix (keyed by `key`)."""

    task_id: str
    version: int
    sha256: str
    method: str
    prompt: SoftPrompt
    input_format: InputFormat = RAW_FORMAT  # how a plain `prompt` is formatted for this task

    @property
    def key(self) -> TaskKey:
        return (self.task_id, self.version, self.sha256)
