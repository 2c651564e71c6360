"""Request and response models of the HTTP API, with explicit bounds."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prompt_store import TASK_ID_PATTERN

HARD_MAX_NEW_TOKENS = 8192
DEFAULT_NEW_TOKENS = 64  # schema bound; the configured cap (SOFTSERVE_MAX_NEW_TOKENS) is checked too
MAX_PROMPT_CHARS = 1_000_000
MAX_STOP = 8
MAX_CHOICES = 16  # n: completions per prompt, one batch row each
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries

TaskIdField = Annotated[str, Field(pattern=TASK_ID_PATTERN, max_length=64, description="task id, or 'base'")]
StopString = Annotated[str, Field(min_length=1, max_length=128)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
BiasValue = Annotated[float, Field(ge=-100.0, le=100.0)]
TokenKey = Annotated[str, Field(pattern=r"^[0-9]{1,9}$", description="a token id, as a string (JSON keys)")]
LogitBias = Annotated[dict[TokenKey, BiasValue], Field(max_length=MAX_LOGIT_BIAS)]


def bias_pairs(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """{"123": -100} -> ((123, -100.0),), sorted by token id."""
    return tuple(sorted((int(k), float(v)) for k, v in (bias or {}).items()))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=HARD_MAX_NEW_TOKENS,
        description=f"default {DEFAULT_NEW_TOKENS} (capped by the server limit)",
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=100_000, description="0 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopList = Field(default_factory=list)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="completions, one batch row each (seeds derived)")
    presence_penalty: Penalty = Field(0.0, description="OpenAI's, over the generated tokens")
    frequency_penalty: Penalty = Field(0.0, description="OpenAI's, over the generated tokens")
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=10.0, description="CTRL / Hugging Face's, over the generated tokens; 1 = off"
    )
    logit_bias: LogitBias | None = Field(None, description="token id -> added to its logit (-100..100)")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="each token's log-prob and this many alternatives"
    )


class GenerateRequest(SamplingFields):
    task_id: TaskIdField | None = None
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    virtual_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(0, description="prompt tokens whose KV came from the prompt cache")


class Timings(BaseModel):
    time_to_first_token_ms: float | None
    total_ms: float


class TopLogprob(BaseModel):
    token: int
    text: str
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class GenerateChoice(BaseModel):
    index: int
    text: str
    tokens: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


class GenerateResponse(BaseModel):
    """The first choice's text, tokens and log-probs at the top; with n > 1, every choice in `choices`."""

    task_id: str
    task_version: int
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = Field(None, description="when `logprobs` was given")
    choices: list[GenerateChoice] | None = Field(None, description="when n > 1")


class InputFormatOut(BaseModel):
    """How the task was trained to read a request (the manifest's input_format): a plain `prompt` is
    formatted this way; `messages` always go through the chat template."""

    chat_template: bool = Field(description="true: a `prompt` is the user turn of the chat template")
    system_prompt: str | None = Field(
        description="the system message training used (null: the template's own default, or none when raw)"
    )


class TaskResponse(BaseModel):
    task_id: str
    version: int
    method: str
    sha256: str
    created_at: str
    versions: list[int] = Field(default_factory=list)
    input_format: InputFormatOut | None = None


class CompressRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gist_task: TaskIdField | None = Field(
        None, description="a stored gist_embedding task (the learned gist tokens); or give `compressor`"
    )
    compressor: TaskIdField | None = Field(
        None, description="a stored gist_compressor task (gist tokens + a LoRA compressor for this base)"
    )
    instruction: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    keep_instruction: bool = Field(False, description="keep the instruction text in the artifact's manifest")


class TaskList(BaseModel):
    tasks: list[TaskResponse]


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable reason, e.g. limit, not_found, queue_full, not_ready")
    message: str
    field: str | None = Field(None, description="the request field at fault, when there is one")


class ErrorBody(BaseModel):
    """Every error the server raises itself (see server/errors.py)."""

    error: ErrorDetail


class RequestValidationBody(BaseModel):
    """FastAPI's request validation error: one entry per field, with its location, limit and value."""

    detail: list[dict[str, Any]]


def _error(description: str, model: Any = ErrorBody) -> dict[str, Any]:
    return {"model": model, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("malformed request (e.g. an upload that is not an artifact)"),
    401: _error("missing or invalid key"),
    404: _error("unknown task or version"),
    413: _error("body over SOFTSERVE_MAX_BODY_BYTES"),
    422: _error("invalid field or over a limit", ErrorBody | RequestValidationBody),
    429: _error("queue full; retry after Retry-After seconds"),
    500: _error("generation failed"),
    503: _error("not ready: store unreachable or draining; retry after Retry-After seconds"),
    504: _error("request deadline exceeded"),
    507: _error("the store is full (disk space or Redis memory); nothing was written"),
}
