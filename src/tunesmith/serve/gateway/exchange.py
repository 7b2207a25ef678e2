"""One request as the gateway sees it: who asked, which arm answered, its clock (first token, gaps, end), and what is
written about it when it ends (the request log, usage, metrics, the canary's judgement)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, AsyncIterator

from tunesmith.generation.requests import ChoiceUpdate, Failed, GenerationRequest
from tunesmith.records import RequestLogRecord
from tunesmith.request_log import utc_timestamp
from tunesmith.serve.errors import error_of
from tunesmith.serve.gateway.canary import Outcome
from tunesmith.serve.gateway.routing import RouteDecision
from tunesmith.serve.protocol import ChatCompletionRequest, completion_id

if TYPE_CHECKING:
    from tunesmith.serve.gateway.gateway import Gateway

CLIENT_CLOSED = 499
"""Status logged for a request whose client went away before the answer was complete (nginx's convention)."""


class Exchange:
    """Opened when a request is accepted and routed; `finish` (or `fail`) records it exactly once."""

    def __init__(self, gateway: Gateway, key, request, endpoint: str, decision: RouteDecision, shadow: bool = False):
        self.gateway, self.key, self.request, self.endpoint = gateway, key, request, endpoint
        self.decision, self.shadow = decision, shadow
        self.id = completion_id("chatcmpl" if endpoint == "chat" else "cmpl")
        self.arrived = datetime.now(timezone.utc)
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.plans: list[GenerationRequest] = []
        self.choices = request.n
        self.texts: dict[int, list[str]] = {}
        self.tokens: dict[int, int] = {}
        self.last_token_at: dict[int, float] = {}
        self.finish_reasons: dict[int, str] = {}
        self.failure: Failed | None = None
        self._done = False

    @property
    def served(self) -> str:
        return self.decision.arm

    # --- the engine's events (JobEvents calls these) -----------------------------------------------------------

    def on_update(self, index: int, update: ChoiceUpdate) -> None:
        now = time.monotonic()
        if update.text:
            self.texts.setdefault(index, []).append(update.text)
        new_tokens = update.completion_tokens - self.tokens.get(index, 0)
        if new_tokens > 0 and not self.shadow:
            if self.first_token_at is None:
                self.first_token_at = now
                self.gateway.metrics.first_token(self.decision.model, now - self.started)
            elif index in self.last_token_at:
                gap = (now - self.last_token_at[index]) / new_tokens
                for _ in range(new_tokens):
                    self.gateway.metrics.inter_token(self.decision.model, gap)
        if new_tokens > 0:
            self.tokens[index] = update.completion_tokens
            self.last_token_at[index] = now
        if update.finish_reason:
            self.finish_reasons[index] = update.finish_reason

    def on_failed(self, failure: Failed) -> None:
        self.failure = failure

    # --- the end -------------------------------------------------------------------------------------------------

    async def finish(self) -> None:
        """The request ended without an exception: complete, failed inside a stream, or abandoned by its client."""
        if self.failure is not None:
            from tunesmith.serve.engine import GenerationFailed

            await self.fail(GenerationFailed(self.failure))
        elif len(self.finish_reasons) < self.choices * max(1, len(self.plans)):
            await self._record(CLIENT_CLOSED, "the client went away before the answer was complete")
        else:
            await self._record(200, None)

    async def fail(self, exc: Exception) -> None:
        response, _ = error_of(exc)
        await self._record(response.status_code, str(exc))

    @contextlib.asynccontextmanager
    async def recording_failures(self, reraise: bool = True):
        """An exception inside is recorded as this request's failure (and raised on, unless `reraise` is off)."""
        try:
            yield
        except Exception as exc:
            await self.fail(exc)
            if reraise:
                raise

    async def answered(self, response):
        """Record the whole answer, then hand it back carrying this request's id."""
        await self.finish()
        response.id = self.id
        return response

    async def logged_stream(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """The stream's events, the last one (`[DONE]`) held back until the request is recorded, so a client that
        saw the end of its answer finds it in the log even if the server dies right after."""
        held = None
        try:
            async for chunk in chunks:
                if held is not None:
                    yield held
                held = chunk
            await self.finish()
            if held is not None:
                yield held
        finally:
            if not self._done:  # the client went away mid-stream
                await self.finish()

    async def _record(self, status: int, error: str | None) -> None:
        if self._done:
            return
        self._done = True
        latency = time.monotonic() - self.started
        answers = ["".join(self.texts.get(index, [])) for index in range(self.choices * len(self.plans))]
        prompt_tokens = sum(len(plan.prompt_ids) for plan in self.plans)
        completion_tokens = sum(self.tokens.values())
        json_valid = _json_valid(answers[0]) if self._json_checked() and answers and status == 200 else None
        gateway, decision = self.gateway, self.decision
        if self.shadow:
            gateway.metrics.shadow(decision.route, decision.arm, "ok" if status == 200 else "error")
        else:
            gateway.metrics.finished(decision.model, prompt_tokens, completion_tokens, self.finish_reasons.get(0),
                                     latency, status, self.key.name if self.key else None)
            if status != CLIENT_CLOSED and (status >= 500 or status == 200):  # a client's mistake judges no arm
                gateway.router.report(decision, Outcome(status >= 500, latency, json_valid))
            if self.key is not None:
                gateway.limiter.spend(self.key, completion_tokens)
        record = RequestLogRecord(
            id=self.id, time=utc_timestamp(self.arrived), endpoint=self.endpoint,
            key_id=self.key.key_id if self.key else None, key_name=self.key.name if self.key else None,
            user=self.request.user, model=decision.model, served=decision.arm,
            registry_model=None, registry_version=None, route=decision.route,
            arm=decision.arm if decision.route else None, shadow=self.shadow,
            messages=[m.model_dump(exclude_none=True) for m in self.request.messages]
            if isinstance(self.request, ChatCompletionRequest) else None,
            prompt=_prompt_text(self.request), answers=answers, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, latency_s=round(latency, 4),
            ttft_s=round(self.first_token_at - self.started, 4) if self.first_token_at else None,
            finish_reason=self.finish_reasons.get(0), status=status, error=error, json_valid=json_valid)
        record.registry_model, record.registry_version = gateway.version_of(decision.arm)
        # Awaited before the answer leaves (a crash then loses only what was in flight); shielded so a client that
        # hangs up mid-write cannot cancel it half way.
        await asyncio.shield(asyncio.to_thread(gateway.persist, record, self.key, prompt_tokens, completion_tokens))

    def _json_checked(self) -> bool:
        fmt = getattr(self.request, "response_format", None)
        return self.gateway.router.json_checked(self.decision.model) or bool(fmt and fmt.type != "text")


def _json_valid(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _prompt_text(request) -> str | None:
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n\n".join(prompt)
    return None
