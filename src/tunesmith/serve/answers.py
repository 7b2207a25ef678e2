"""From engine events to OpenAI answers: whole responses, server-sent chunks, usage, log-probabilities.

The engine thread hands each event to the request's asyncio queue; a client that disconnects (or a stream that is
closed) cancels the request, which frees its rows at the next decode step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from tunesmith.generation.requests import ChoiceUpdate, Failed, GenerationRequest, TokenLogprob
from tunesmith.serve.engine import GenerationFailed, ServingEngine
from tunesmith.serve.errors import error_body
from tunesmith.serve.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    TextChoice,
    TextLogprobs,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
    completion_id,
    now,
)

DISCONNECT_POLL_SECONDS = 0.5


class JobEvents:
    """The events of one HTTP request's generation requests (several prompts, `n` choices each), choice indexes
    numbered across prompts."""

    def __init__(self, handles: list, queue: asyncio.Queue, choices: int, watch=None):
        self.handles, self.queue, self.choices = handles, queue, choices
        self.watch = watch
        """Told of every update and failure (`on_update(index, update)`, `on_failed(failed)`): the gateway's clock."""

    @classmethod
    def submit(cls, engine: ServingEngine, plans: list[GenerationRequest], watch=None) -> JobEvents:
        loop, queue, handles = asyncio.get_running_loop(), asyncio.Queue(), []
        try:
            offset = 0
            for plan in plans:
                def emit(event, offset=offset):
                    loop.call_soon_threadsafe(queue.put_nowait, (offset, event))

                handles.append(engine.submit(plan, emit))
                offset += plan.n
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return cls(handles, queue, offset, watch)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def updates(self, raw: Request | None = None) -> AsyncIterator[tuple[int, ChoiceUpdate]]:
        """(choice index, update) until every choice has finished; a Failed event raises GenerationFailed, a
        disconnected client (when `raw` is given) ends it quietly. The request is cancelled however it ends."""
        unfinished = self.choices
        try:
            while unfinished:
                try:
                    offset, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if raw is not None and await raw.is_disconnected():
                        return
                    continue
                if isinstance(event, Failed):
                    if self.watch is not None:
                        self.watch.on_failed(event)
                    raise GenerationFailed(event)
                unfinished -= event.finish_reason is not None
                if self.watch is not None:
                    self.watch.on_update(offset + event.index, event)
                yield offset + event.index, event
        finally:
            self.cancel()

    async def collect(self, collector: ChoiceCollector, raw: Request) -> None:
        async for index, update in self.updates(raw):
            collector.add(index, update)


@dataclass
class _ChoiceSoFar:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class ChoiceCollector:
    """Whole answers, choice by choice, for a non-streamed response."""

    def __init__(self, choices: int):
        self.choices = [_ChoiceSoFar() for _ in range(choices)]

    def add(self, index: int, update: ChoiceUpdate) -> None:
        choice = self.choices[index]
        choice.text.append(update.text)
        choice.logprobs.extend(update.logprobs)
        choice.completion_tokens = update.completion_tokens
        choice.finish_reason = update.finish_reason or choice.finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)


def _usage(plans: list[GenerationRequest], completion_tokens: int) -> Usage:
    prompt_tokens = sum(len(plan.prompt_ids) for plan in plans)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


# --- chat ------------------------------------------------------------------------------------------------------

def _chat_logprobs(entries) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprobEntry(token=e.token, logprob=e.logprob, bytes=e.bytes,
                          top_logprobs=[TopLogprob(token=t, logprob=v, bytes=b) for t, v, b in e.top])
        for e in entries])


def chat_response(request: ChatCompletionRequest, collector: ChoiceCollector,
                  plans: list[GenerationRequest]) -> ChatCompletionResponse:
    choices = [Choice(index=i, message=AssistantMessage(content="".join(c.text)), finish_reason=c.finish_reason,
                      logprobs=_chat_logprobs(c.logprobs) if request.logprobs else None)
               for i, c in enumerate(collector.choices)]
    return ChatCompletionResponse(model=request.model, choices=choices,
                                  usage=_usage(plans, collector.completion_tokens))


async def chat_chunks(request: ChatCompletionRequest, events: JobEvents,
                      stream_id: str | None = None) -> AsyncIterator[str]:
    """`data: {chunk}` events: each choice's role, its text deltas, its finish reason; usage when asked; `[DONE]`."""
    stream_id, created, completion_tokens = stream_id or completion_id(), now(), {}

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=stream_id, created=created, model=request.model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"

    for index in range(events.choices):
        yield event([ChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
    try:
        async for index, update in events.updates():
            completion_tokens[index] = update.completion_tokens
            if update.text or update.logprobs:
                logprobs = _chat_logprobs(update.logprobs) if request.logprobs else None
                yield event([ChunkChoice(index=index, delta=DeltaMessage(content=update.text), logprobs=logprobs)])
            if update.finish_reason:
                yield event([ChunkChoice(index=index, delta=DeltaMessage(), finish_reason=update.finish_reason)])
        if request.stream_options and request.stream_options.include_usage:
            plans = [handle.request for handle in events.handles]
            yield event([], usage=_usage(plans, sum(completion_tokens.values())))
    except GenerationFailed as exc:  # the status line is already sent, so the error travels as an event
        kind = "deadline_exceeded" if exc.reason == "deadline" else None
        yield f"data: {error_body(str(exc), 'server_error', code=kind).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


# --- text completions -------------------------------------------------------------------------------------------

def _text_logprobs(entries, start_offset: int) -> TextLogprobs:
    logprobs, offset = TextLogprobs(), start_offset
    for e in entries:
        logprobs.tokens.append(e.token)
        logprobs.token_logprobs.append(e.logprob)
        logprobs.top_logprobs.append({t: v for t, v, _ in e.top})
        logprobs.text_offset.append(offset)
        offset += len(e.token)
    return logprobs


def completion_response(request: CompletionRequest, collector: ChoiceCollector, plans: list[GenerationRequest],
                        echoes: list[str]) -> CompletionResponse:
    choices = []
    for i, c in enumerate(collector.choices):
        echo = echoes[i // request.n]
        logprobs = _text_logprobs(c.logprobs, len(echo)) if request.logprobs is not None else None
        choices.append(TextChoice(index=i, text=echo + "".join(c.text), finish_reason=c.finish_reason,
                                  logprobs=logprobs))
    return CompletionResponse(model=request.model, choices=choices, usage=_usage(plans, collector.completion_tokens))


async def completion_chunks(request: CompletionRequest, events: JobEvents, echoes: list[str],
                            stream_id: str | None = None) -> AsyncIterator[str]:
    stream_id, created, completion_tokens, offsets = stream_id or completion_id("cmpl"), now(), {}, {}

    def event(choices: list[TextChoice], usage: Usage | None = None) -> str:
        chunk = CompletionResponse(id=stream_id, created=created, model=request.model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"

    for index in range(events.choices):
        if echoes[index // request.n]:
            yield event([TextChoice(index=index, text=echoes[index // request.n])])
    try:
        async for index, update in events.updates():
            completion_tokens[index] = update.completion_tokens
            offset = offsets.get(index, len(echoes[index // request.n]))
            logprobs = _text_logprobs(update.logprobs, offset) if request.logprobs is not None else None
            offsets[index] = offset + len(update.text)
            yield event([TextChoice(index=index, text=update.text, finish_reason=update.finish_reason,
                                    logprobs=logprobs)])
        if request.stream_options and request.stream_options.include_usage:
            plans = [handle.request for handle in events.handles]
            yield event([], usage=_usage(plans, sum(completion_tokens.values())))
    except GenerationFailed as exc:
        yield f"data: {error_body(str(exc), 'server_error').model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"
