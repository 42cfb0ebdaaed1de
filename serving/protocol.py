"""OpenAI wire types (pydantic), in OpenAI's field order, with strict validation.

A field the server does not implement is rejected with a 400 that names it (never silently ignored) unless its
value is one that changes nothing (``store: false``, ``response_format: {"type": "text"}``, ...); unknown
fields are rejected too, ``null`` means "not given", types stay strict. Requests convert themselves into
engine ``SamplingParams``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.errors import InvalidRequestError, UnsupportedFieldError
from serving.sampler import SamplingParams

MAX_STOP = 4
MAX_STOP_TOKEN_IDS = 64

# Fields OpenAI defines that this server does not implement: a request that sets them gets a 400 naming them,
# unless the value given is one that changes nothing (NOOP_* below, accepted and dropped).
UNSUPPORTED_CHAT_FIELDS = ("functions", "function_call", "logit_bias", "audio", "modalities", "prediction",
                           "reasoning_effort", "web_search_options", "store")
UNSUPPORTED_COMPLETION_FIELDS = ("best_of", "echo", "logit_bias", "suffix")
# Values of those fields that ask for what the server does anyway (OpenAI's defaults): nothing changes.
NOOP_CHAT_VALUES: dict[str, tuple[Any, ...]] = {
    "store": (False,), "modalities": (["text"],), "logit_bias": ({},), "functions": ([],), "function_call": ("none",),
}
NOOP_COMPLETION_VALUES: dict[str, tuple[Any, ...]] = {"best_of": (1,), "echo": (False,), "logit_bias": ({},),
                                                      "suffix": ("",)}


def _forgive(data: dict[str, Any], unsupported: tuple[str, ...], noop: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Drop the no-op values of unsupported fields; any other value of one is a 400 naming it."""
    for name in unsupported:
        if name in data:
            if any(type(data[name]) is type(v) and data[name] == v for v in noop.get(name, ())):
                del data[name]
            else:
                raise UnsupportedFieldError(name)
    return data


class _Strict(BaseModel):
    """Unknown fields are a 400; ``null`` for any field means "not given" (its default), as OpenAI reads it.
    Types are strict: ``"10"`` is not an integer, ``"true"`` not a boolean (an integer is a number, as in JSON)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = cls._forgive({k: v for k, v in data.items() if v is not None})
        return data

    @classmethod
    def _forgive(cls, data: dict[str, Any]) -> dict[str, Any]:
        return data


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    refusal: str | None = None  # an assistant turn's refusal: rendered as its text when it has no content
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # role "tool": the call this result answers

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p["text"] for p in self.content)
        return self.content or self.refusal or ""

    def template_dict(self) -> dict[str, Any]:
        """This message as the chat template reads it (``developer`` is OpenAI's new name for ``system``)."""
        d: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            d["name"] = self.name
        return d


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # constrained either way: only the schema's own properties are generated

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(_Strict):
    model: str
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None  # read only when streaming (it changes nothing otherwise)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # vLLM's sampling extensions (OpenWebUI, LiteLLM and the openai client's extra_body send them)
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens; 0 or -1: all.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens less likely than min_p x the top one.")
    # ge=0.01, not gt=0: schemathesis sent 5e-324, the division made the logits inf and the NaN probabilities
    # killed the engine loop (every later request 503); at 0.01 a logit of 650 stays finite even in fp16.
    repetition_penalty: float = Field(1.0, ge=0.01, le=2.0, description="Divide (x for negative) the logits of "
                                      "tokens already in the prompt or output; 1: off.")
    min_tokens: int = Field(0, ge=0, description="End-of-sequence and stop_token_ids are not sampled before this "
                                                 "many tokens.")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False  # vLLM's extension: generate until max_tokens or a stop string, past end-of-sequence

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.min_tokens and self.min_tokens > self.max_new_tokens(self.min_tokens):
            raise InvalidRequestError("min_tokens must not exceed max_tokens", param="min_tokens")
        return self

    def max_new_tokens(self, default: int) -> int:
        raise NotImplementedError

    def sampling_params(self, default_max_tokens: int, index: int = 0) -> SamplingParams:
        seed = None if self.seed is None else (self.seed + index) % (2**63)
        return SamplingParams(max_tokens=self.max_new_tokens(default_max_tokens), temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k if self.top_k and self.top_k > 0 else 0,
                              min_p=self.min_p, seed=seed, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              min_tokens=self.min_tokens, stop=list(self.stop or []),
                              stop_token_ids=list(self.stop_token_ids or []), logprobs=self._want_logprobs(),
                              top_logprobs=self._top_logprobs(), ignore_eos=self.ignore_eos)

    def _want_logprobs(self) -> bool:
        return bool(self.logprobs)

    def _top_logprobs(self) -> int:
        return self.top_logprobs or 0


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # accepted, changing nothing here: tags for OpenAI's dashboard, a tier, cache and abuse-tracking hints
    metadata: dict[str, str] | None = Field(None, max_length=16)
    service_tier: Literal["auto", "default"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @classmethod
    def _forgive(cls, data: dict[str, Any]) -> dict[str, Any]:
        return _forgive(data, UNSUPPORTED_CHAT_FIELDS, NOOP_CHAT_VALUES)

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        names = [t.function.name for t in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise InvalidRequestError(f"tool_choice names function '{self.tool_choice.function.name}', which is "
                                      "not in tools", param="tool_choice")
        if self.tool_choice == "required" and not names:
            raise InvalidRequestError("tool_choice 'required' needs tools", param="tool_choice")
        if self.ignore_eos and (self.forced_tool() or self.json_format()):
            raise InvalidRequestError("ignore_eos cannot be combined with a forced tool_choice or a JSON "
                                      "response_format", param="ignore_eos")
        return self

    def forced_tool(self) -> str | None:
        """The function every answer must call, "any" for ``required``, None when calls are optional or off."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return "any" if self.tool_choice == "required" else None

    def tools_enabled(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def json_format(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    def max_new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)  # legacy API: an integer

    @classmethod
    def _forgive(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "top_logprobs" in data:  # the legacy API has no top_logprobs: its logprobs integer is that
            raise UnsupportedFieldError("top_logprobs")
        return _forgive(data, UNSUPPORTED_COMPLETION_FIELDS, NOOP_COMPLETION_VALUES)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            v = v[0]
        if not v:  # "", [""] and []: nothing to continue from (the engine would refuse it as a server error)
            raise ValueError("prompt must not be empty")
        return v

    def max_new_tokens(self, default: int) -> int:
        return self.max_tokens or default

    def _want_logprobs(self) -> bool:
        return self.logprobs is not None

    def _top_logprobs(self) -> int:
        return self.logprobs or 0


# ------------------------------------------------------------------------------------------ responses


def make_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens read from the prefix cache, as OpenAI and vLLM report them


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed call: the first delta of each has ``id``, ``type`` and ``function.name``; later ones add
    argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "colossal-rlhf"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
