"""The OpenAI Chat Completions API subset we serve, as pydantic schemas (requests, responses, errors)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str
    """A string, or OpenAI's list of content parts: text parts are joined in order (as OpenAI concatenates them)."""

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_joined(cls, content):
        return join_text_parts(content) if isinstance(content, list) else content

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, content: str) -> str:
        return _check_unicode(content)


def join_text_parts(parts: list) -> str:
    """The text of OpenAI content parts (`[{"type": "text", "text": ...}]`), joined with no separator; any other
    kind of part (image_url, input_audio, file, refusal) is refused, since this server reads text only."""
    if not parts:
        raise ValueError("a list of content parts must hold at least one text part")
    texts = []
    for number, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"type {kind!r}" if isinstance(kind, str) else "no `type`"
            raise ValueError(f"content part {number} has {what}: this server takes text only; send "
                             '{"type": "text", "text": "..."} parts or a string')
        if not isinstance(part.get("text"), str):
            raise ValueError(f'content part {number} needs a string `text`')
        texts.append(part["text"])
    return "".join(texts)


def _check_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds an unpaired surrogate at character {exc.start}; send valid Unicode text") from None
    return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = "answer"
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text` (no constraint), `json_object` (any JSON object) or `json_schema` (an answer that matches it)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a `json_schema` object with a `schema`")
        return self


UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "prediction": (None,), "audio": (None,),
               "modalities": (None, ["text"]), "suffix": (None, ""), "web_search_options": (None,),
               "reasoning_effort": (None,), "verbosity": (None,), "store": (None, False),
               "service_tier": (None, "auto", "default")}
"""Request fields this server cannot honour, with the values that ask for nothing; anything else is a 400.
(`store: true` asks OpenAI to keep the completion for later retrieval, and `flex`/`priority` tiers ask for a
different service: we offer neither, so only the values that ask for nothing pass.)"""

IGNORED = frozenset({"metadata", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"})
"""Fields OpenAI clients send that no value of can change an answer, accepted and dropped: `metadata` only tags
stored completions (never stored here), `parallel_tool_calls` only matters with tools (refused above),
`prompt_cache_key` is a cache hint (our prefix cache needs none), `safety_identifier` an end-user id for OpenAI's
abuse monitoring. Every other field the schema does not declare is a 400 naming it."""

MAX_CHOICES = 16


def _refuse_unsupported(raw):
    """Options that would change the answer are refused, never silently ignored; those that ask for nothing are
    dropped here, so that any field still undeclared is an unknown parameter."""
    if not isinstance(raw, dict):
        return raw
    for name, harmless in UNSUPPORTED.items():
        if name in raw and raw[name] not in harmless:
            raise ValueError(f"`{name}` is not supported by this server; leave it out")
    return {name: value for name, value in raw.items() if name not in UNSUPPORTED and name not in IGNORED}


def _valid_stop(stop):
    if stop is not None and any(s == "" for s in ([stop] if isinstance(stop, str) else stop)):
        raise ValueError("stop strings must not be empty")
    return stop


class SamplingFields(BaseModel):
    """What chat and text completions share. An undeclared field is refused (`extra_forbidden`, which the error
    handler words as an unknown parameter), unless `UNSUPPORTED` or `IGNORED` above names it."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    user: str | None = Field(default=None, max_length=256)
    """The caller's end user: logged, and what `sticky: user` routes keep on one arm."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_we_would_ignore(cls, raw):
        return _refuse_unsupported(raw)

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop):
        return _valid_stop(stop)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    """A chat completion request."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def token_limit(self, default: int) -> int:
        """The most tokens to generate: `max_completion_tokens`, else `max_tokens`, else the server default."""
        return self.max_completion_tokens or self.max_tokens or default

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    """A text completion request: a raw prompt (text, or token ids), no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _valid_unicode(cls, prompt):
        for text in [prompt] if isinstance(prompt, str) else prompt:
            if isinstance(text, str):
                _check_unicode(text)
        return prompt

    @model_validator(mode="after")
    def _plain_options(self):
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported; leave it out (or equal to n)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (the prompt's log-probabilities) is not supported; ask for one")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request (a list of strings or of token-id lists is several prompts)."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def token_limit(self, default: int) -> int:
        return self.max_tokens or default


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion; all chunks of one stream share `id` and `created`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: TextLogprobs | None = None


class CompletionResponse(BaseModel):
    """A text completion, whole or as one streamed chunk (`usage` only on the whole one or the last chunk)."""

    id: str = Field(default_factory=lambda: completion_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """A served model as vLLM lists it: fine-tuned versions name their base as `parent`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "tunesmith"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a verdict on one answer this server gave, optionally with the answer wanted instead."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=200)
    rating: Literal["positive", "negative", "neutral"]
    corrected: str | None = Field(default=None, max_length=200_000)
    comment: str | None = Field(default=None, max_length=10_000)


class FeedbackResponse(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    completion_id: str
    rating: str
