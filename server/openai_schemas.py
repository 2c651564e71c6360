"""Request models of /v1/completions and /v1/chat/completions: every parameter of OpenAI's API is declared.

Each parameter is one of three kinds (docs/openai.md lists them):
- honoured: it changes the output as OpenAI documents it (sampling, penalties, logit_bias, logprobs, n, ...);
- a no-op accepted only because it cannot change the output (metadata, store=false, service_tier auto or
  default, user — logged as a hash —, safety_identifier, prompt_cache_key, parallel_tool_calls without tools);
- refused with a 400 naming it when its value would ask for something this server does not do (tools,
  response_format other than text, audio, ...): `refusal()` returns that error; never accepted and ignored.
A parameter OpenAI does not define is refused by the schema (extra="forbid", a 422 naming it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from server.errors import BadRequest
from server.schemas import (
    HARD_MAX_NEW_TOKENS,
    MAX_CHOICES,
    MAX_PROMPT_CHARS,
    MAX_TOP_LOGPROBS,
    LogitBias,
    Penalty,
    StopList,
    StopString,
    TaskIdField,
)

MAX_PROMPTS = 64  # completions: prompts in one request
MAX_ROWS = 64  # prompts x n: engine rows one request may take
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_MESSAGES = 256
MAX_PARTS = 256  # content parts of one message
MAX_TOKEN_ID = 2**31 - 1
ShortText = Annotated[str, Field(max_length=512)]
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]], Field(min_length=1, max_length=MAX_PROMPT_CHARS)
]
PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
PromptContent = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class Unsupported(BadRequest):
    """A known OpenAI parameter (or value) this server does not implement: 400 naming it."""

    reason = "unsupported_parameter"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = Field(None, description="a last chunk with `usage` (and no choices)")
    include_obfuscation: bool | None = Field(None, description="refused when true: no obfuscation fields")


class OpenAIBase(BaseModel):
    """The parameters both routes share. `null` is always the default, as OpenAI's client may send it."""

    model_config = ConfigDict(extra="forbid")
    model: TaskIdField = Field("base", description="task id; 'base' = the bare model")
    max_tokens: int | None = Field(None, ge=1, le=HARD_MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 0 (greedy)")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="choices, one batch row each")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="choice i > 0 gets a seed derived from it")
    stop: StopString | StopList | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    user: ShortText | None = Field(None, description="logged as a hash only")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def choices(self) -> int:
        return self.n or 1

    def refusal(self) -> Unsupported | None:
        """The first parameter whose value asks for what this server does not do (else None)."""
        if self.stream_options is not None and not self.stream:
            return Unsupported("stream_options is only allowed with stream=true", field="stream_options")
        if self.stream_options is not None and self.stream_options.include_obfuscation:
            return unsupported("stream_options.include_obfuscation", "stream obfuscation is not implemented")
        return None


def unsupported(param: str, why: str) -> Unsupported:
    return Unsupported(f"unsupported parameter {param}: {why}", field=param)


class CompletionRequest(OpenAIBase):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="text, texts, token ids, or lists of token ids (each prompt its own choices)")
    echo: bool | None = Field(None, description="prepend the prompt to each choice's text")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="only best_of == n (or unset)")
    suffix: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="refused: no insertion mode")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: texts, or token id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [cast(list[int], p)]
        return cast(list[str | list[int]], list(p))

    def refusal(self) -> Unsupported | None:
        n = self.choices()
        if self.best_of is not None and self.best_of != n:
            return unsupported("best_of", f"only best_of equal to n ({n}): no ranking of extra candidates")
        if self.suffix:
            return unsupported("suffix", "insertion (a suffix after the completion) is not implemented")
        if self.echo and self.logprobs is not None:
            return unsupported(
                "echo", "echo with logprobs needs the prompt's log-probs, which are not computed"
            )
        return super().refusal()


class ChatMessage(BaseModel):
    """An input message. Roles system, developer (templated as system), user and assistant; content a string
    or a list of text parts. Refused: tool and function roles, names, tool calls, non-text parts."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: PromptContent | Annotated[list[dict[str, Any]], Field(max_length=MAX_PARTS)] | None = None
    name: ShortText | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: ShortText | None = None
    function_call: Any = None
    refusal: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    audio: Any = None

    def text(self, where: str) -> str:
        """The content as text (text parts joined with newlines, as vLLM does); refuses what it cannot be."""
        if self.role in ("tool", "function"):
            raise unsupported(f"{where}.role", f"role '{self.role}' (tool calling is not implemented)")
        for name in ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio"):
            if getattr(self, name) is not None:
                raise unsupported(f"{where}.{name}", "only role and text content are implemented")
        if self.content is None:
            raise BadRequest(f"{where}.content is required", field=f"{where}.content")
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text" or set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise unsupported(
                    f"{where}.content[{j}]",
                    f"content part of type {str(kind)[:32]!r}: only {{'type': 'text', 'text': ...}} parts",
                )
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=HARD_MAX_NEW_TOKENS, description="= max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    parallel_tool_calls: bool | None = Field(None, description="a no-op: tools are refused")
    metadata: Annotated[dict[ShortText, ShortText], Field(max_length=16)] | None = Field(
        None, description="a no-op"
    )
    store: bool | None = Field(None, description="false: a no-op; true is refused (nothing is stored)")
    service_tier: str | None = Field(None, description="auto or default: a no-op (one tier); others refused")
    prompt_cache_key: ShortText | None = Field(None, description="a no-op (prefix caching is automatic)")
    safety_identifier: ShortText | None = Field(None, description="a no-op")
    # refused unless unset (or the one value that changes nothing): see `refusal`
    audio: Any = None
    function_call: Any = None
    functions: list[Any] | None = None
    modalities: list[str] | None = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    response_format: dict[str, Any] | None = None
    tool_choice: Any = None
    tools: list[Any] | None = None
    verbosity: Any = None
    web_search_options: Any = None

    def max_new(self) -> tuple[int | None, str]:
        """(the token limit, the field that set it): max_completion_tokens, else max_tokens."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def top_k_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None when not asked, else the number of alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template sees them: developer is system, parts are joined text."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages[{i}]")}
            for i, m in enumerate(self.messages)
        ]

    def refusal(self) -> Unsupported | None:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            return Unsupported(
                "max_tokens and max_completion_tokens differ; send one (max_completion_tokens)",
                field="max_completion_tokens",
            )
        if self.top_logprobs is not None and not self.logprobs:
            return Unsupported("top_logprobs requires logprobs=true", field="top_logprobs")
        if self.tools or self.functions:
            return unsupported("tools" if self.tools else "functions", "tool calling is not implemented")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            name = "tool_choice" if self.tool_choice not in (None, "none") else "function_call"
            return unsupported(name, "tool calling is not implemented (only 'none')")
        if self.response_format is not None and self.response_format != {"type": "text"}:
            return unsupported("response_format", "only {'type': 'text'}: no JSON mode or schemas")
        if self.modalities is not None and self.modalities != ["text"]:
            return unsupported("modalities", "only ['text']")
        for name in REFUSED_UNLESS_NULL:
            if getattr(self, name) is not None:
                return unsupported(name, REFUSED_UNLESS_NULL[name])
        if self.store:
            return unsupported("store", "stored completions are not implemented; send false or omit it")
        if self.service_tier not in (None, "auto", "default"):
            return unsupported("service_tier", "only 'auto' and 'default' (one tier)")
        return super().refusal()


REFUSED_UNLESS_NULL = {
    "audio": "audio output is not implemented",
    "moderation": "moderation is not implemented",
    "prediction": "predicted outputs are not implemented",
    "prompt_cache_options": "prompt caching is automatic and not configurable",
    "prompt_cache_retention": "prompt caching is automatic and not configurable",
    "reasoning_effort": "this model does not reason with an effort setting",
    "verbosity": "verbosity is not implemented",
    "web_search_options": "web search is not implemented",
}
