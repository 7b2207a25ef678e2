"""Continuous batching: requests join and leave the running batch at every decode step.

Each step (1) drops cancelled and overdue requests, (2) prefills waiting prompts in chunks of at most
`prefill_chunk` tokens so running rows are never stalled for long, (3) decodes one token for every running row of
every model group in one forward pass per group. Where the next prompts go to a group that is decoding, their
tokens (within the same budget) ride in its decode pass instead of a pass of their own (see `fused_step`). A group is
one model in memory (`model_group`): a base with any number of LoRA adapters (rows of different adapters share the
pass, see `multi_lora`), or a fully fine-tuned model of its own.

Why not transformers' ContinuousBatchingManager: it takes one generation config for the whole batch and one set of
weights, while a served batch mixes adapters, sampling settings, grammars and log-probability requests per row.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from tunesmith.errors import TunesmithError
from tunesmith.generation.constraints import mask_logits
from tunesmith.generation.fused_step import FusedStep, Segment
from tunesmith.generation.model_group import ModelGroup
from tunesmith.generation.padded_batch import PaddedBatch, new_cache
from tunesmith.generation.prefix_cache import PrefixCache
from tunesmith.generation.requests import ChoiceUpdate, Event, Failed, GenerationRequest, SamplingParams, TokenLogprob
from tunesmith.generation.sampling import choose_tokens, seeded_generator, token_logprobs
from tunesmith.generation.text_stream import TextStream


RETIRE_CHECK_SECONDS = 1.0
"""How often an idle engine looks again at routes waiting to be dropped (a caller may have let go of its plan)."""


class EngineBusy(TunesmithError):
    """The waiting queue is full: the caller should retry after `retry_after` seconds (a 429 in the API)."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy ({waiting} requests waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class EngineClosed(TunesmithError):
    """The engine is shutting down and takes no new requests (a 503 in the API)."""


@dataclass
class Route:
    """How one served name generates: its model group, its adapter there (None: the group's model as it is), the
    tokens that end its turn, and a tokenizer owned by the engine thread for decoding."""

    group: ModelGroup
    adapter: str | None
    stop_ids: frozenset[int]
    decoder: object  # tokenizers.Tokenizer

    def describe(self, token: int) -> tuple[str, list[int]]:
        text = self.decoder.decode([token], skip_special_tokens=False)
        return text, list(text.encode("utf-8", "surrogatepass"))


class RequestHandle:
    """A submitted request; `cancel()` frees its rows at the next step (a client that walked away)."""

    def __init__(self, request: GenerationRequest, emit: Callable[[Event], None], wake: Callable[[], None]):
        self.request, self._emit, self._wake = request, emit, wake
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()

    def emit(self, event: Event) -> None:
        try:
            self._emit(event)
        except Exception:  # the listener is gone (closed loop, dropped queue): stop generating for it
            self.cancelled = True

    @property
    def overdue(self) -> bool:
        return self.request.deadline is not None and time.monotonic() > self.request.deadline


@dataclass
class _Pending:
    """A request whose prompt is being prefilled into its own cache."""

    handle: RequestHandle
    route: Route
    cache: object
    done: int = 0


@dataclass
class _Row:
    """One choice being decoded."""

    handle: RequestHandle
    index: int
    route: Route
    stream: TextStream
    generator: object
    matcher: object | None
    prompt_tokens: int
    produced: int = 0
    last_token: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params

    def accept(self, token: int, logprob: TokenLogprob | None) -> bool:
        """Take the chosen token, tell the listener what became final; True when this choice has finished."""
        self.produced += 1
        self.last_token = token
        reason = None
        if self.matcher is not None:
            self.matcher.consume_token(token)
        if token in self.route.stop_ids:
            reason = "stop"
        else:
            if logprob is not None:
                self.logprobs.append(logprob)
            if self.stream.push(token) or (self.matcher is not None and self.matcher.is_stopped()):
                reason = "stop"
        if reason is None and self.produced >= self.params.max_tokens:
            reason = "length"
        text = self.stream.take_rest() if reason else self.stream.take_ready()
        if text or reason:  # log-probabilities of tokens that made no text yet travel with the next text
            self.handle.emit(ChoiceUpdate(self.index, text, reason, self.prompt_tokens, self.produced,
                                          tuple(self.logprobs)))
            self.logprobs = []
        return reason is not None


class BatchingEngine:
    """Serves `routes` (served name -> Route): `submit` from any thread, `start()` a decoding thread, or
    `run_until_done()` in the caller's thread (evaluation). Routes and groups change only on the engine thread,
    between steps (`add_route`, `retire_route`, `call_between_steps`)."""

    def __init__(self, routes: dict[str, Route], max_batch: int = 32, max_waiting: int = 64,
                 prefill_chunk: int = 256):
        self.routes = routes
        self.groups = list({id(route.group): route.group for route in routes.values()}.values())
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self._waiting: deque[RequestHandle] = deque()
        self._prefilling: _Pending | None = None
        self._in_prefill: list[_Pending] = []  # admitted and being prefilled together this step
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = self._stopping = False
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._retiring: dict[str, tuple[Callable[[], bool] | None, Callable[[], None] | None]] = {}
        self.prefixes = PrefixCache()

    # --- callers -------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> RequestHandle:
        """Queue a request; events reach `emit` from the engine thread. Raises EngineBusy or EngineClosed."""
        if request.model not in self.routes:
            raise TunesmithError(f"model {request.model!r} is not served here")
        handle = RequestHandle(request, emit, self._wake)
        with self._wakeup:
            if self._closed:
                raise EngineClosed("the server is shutting down; send the request to another replica or retry later")
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusy(len(self._waiting), retry_after=max(1, len(self._waiting) // max(1, self.max_batch)))
            self._waiting.append(handle)
            self._wakeup.notify()
        return handle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Take no new requests; those already in keep going."""
        with self._wakeup:
            self._closed = True

    def stop(self) -> None:
        """Stop the decoding thread (what is still running gets no more events)."""
        self.close()
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def run_until_done(self) -> None:
        """Decode in the caller's thread until every submitted request has finished."""
        while self.has_work():
            self.step()

    @property
    def running(self) -> int:
        return sum(len(group.rows) for group in self.groups) + (self._prefilling is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def running_by_model(self) -> dict[str, int]:
        """Rows being decoded (and a prompt being prefilled) per route name; a snapshot, safe from any thread."""
        counts = Counter(row.handle.request.model for group in list(self.groups) for row in list(group.rows))
        prefilling = self._prefilling
        if prefilling is not None:
            counts[prefilling.handle.request.model] += 1
        return dict(counts)

    def waiting_by_model(self) -> dict[str, int]:
        """Queued requests per route name; a snapshot, safe from any thread."""
        with self._wakeup:
            return dict(Counter(handle.request.model for handle in self._waiting))

    def has_work(self) -> bool:
        return bool(self._calls or self._waiting or self._prefilling or any(group.rows for group in self.groups))

    # --- changing what is served ---------------------------------------------------------------------------

    def call_between_steps(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread before its next step (in the caller's thread when no engine thread runs);
        its result or exception arrives in the returned future."""
        future: Future = Future()
        with self._wakeup:
            if self._thread is not None and self._thread.is_alive() and not self._stopping:
                self._calls.append((fn, future))
                self._wakeup.notify()
                return future
        _run_into(fn, future)
        return future

    def add_route(self, name: str, route: Route, prepare: Callable[[], None] | None = None) -> Future:
        """Serve `route` under `name` from the next step on; `prepare` (such as giving its adapter a slot in a
        stacked model) runs first, on the engine thread."""
        def add() -> None:
            if prepare is not None:
                prepare()
            self._retiring.pop(name, None)
            self.routes[name] = route
            if all(group is not route.group for group in self.groups):
                self.groups.append(route.group)
        return self.call_between_steps(add)

    def retire_route(self, name: str, held: Callable[[], bool] | None = None,
                     then: Callable[[], None] | None = None) -> Future:
        """Drop the route `name` (and its group, when no other route uses it) once no queued or running request
        uses it and `held()` is false; `then` runs on the engine thread right after. `submit` keeps accepting it
        until then, so requests planned for it never fail."""
        def retire() -> None:
            self._retiring[name] = (held, then)
            self._retire_unused()
        return self.call_between_steps(retire)

    def keep_route(self, name: str) -> Future:
        """Cancel a retirement; the future says whether the route is still served (False: it was dropped)."""
        def keep() -> bool:
            self._retiring.pop(name, None)
            return name in self.routes
        return self.call_between_steps(keep)

    # --- the loop ------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                if not self.has_work() and not self._stopping:
                    self._wakeup.wait(RETIRE_CHECK_SECONDS if self._retiring else None)
                if self._stopping:
                    break
                working = self.has_work()
            if working:
                self.step()
            else:
                self._retire_unused()
        self._run_calls()  # whoever waits on a call queued before the stop gets its answer

    def step(self) -> None:
        """Run the calls queued between steps, drop what was cancelled, prefill within the budget, then one decode
        pass per busy group; finally drop retired routes nobody uses any more."""
        import torch

        self._run_calls()  # outside inference mode: they may change weights that later calls change again
        with torch.inference_mode():
            self._drop_cancelled()
            fused = self._group_to_fuse()
            try:
                if fused is not None:
                    self._decode_and_prefill(fused)
                else:
                    self._prefill()
            except Exception as exc:  # our bug or out of memory: that request fails, the engine goes on
                self._fail_pending(exc)
                if fused is not None:
                    self._fail_group(fused, exc)
            for group in self.groups:
                if group.rows and group is not fused:
                    try:
                        self._decode(group)
                    except Exception as exc:
                        self._fail_group(group, exc)
        self._retire_unused()

    def _run_calls(self) -> None:
        while True:
            with self._wakeup:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            _run_into(fn, future)

    def _retire_unused(self) -> None:
        for name, (held, then) in list(self._retiring.items()):
            route = self.routes.get(name)
            # held() first: a plan it stops holding has been queued by then, where _route_in_use sees it
            if route is not None and ((held is not None and held()) or self._route_in_use(name, route)):
                continue
            del self._retiring[name]
            self.routes.pop(name, None)
            if route is not None and all(other.group is not route.group for other in self.routes.values()):
                self.groups = [group for group in self.groups if group is not route.group]
            if then is not None:
                try:
                    then()
                except Exception:  # our bug: the route is gone either way, the engine goes on
                    logging.getLogger(__name__).exception("releasing the retired route %s failed", name)

    def _route_in_use(self, name: str, route: Route) -> bool:
        with self._wakeup:
            if any(handle.request.model == name for handle in self._waiting):
                return True
        pending = self._prefilling
        return ((pending is not None and pending.route is route)
                or any(row.route is route for group in self.groups for row in group.rows))

    def _drop_cancelled(self) -> None:
        for group in self.groups:
            gone = [i for i, row in enumerate(group.rows) if self._gone(row.handle)]
            if gone:
                group.rows = [group.rows[i] for i in group.batch.remove(gone)]
        if self._prefilling is not None and self._gone(self._prefilling.handle):
            self._prefilling = None
        with self._wakeup:
            for handle in [h for h in self._waiting if self._gone(h)]:
                self._waiting.remove(handle)

    def _gone(self, handle: RequestHandle) -> bool:
        if handle.cancelled:
            return True
        if handle.overdue:
            handle.cancelled = True
            handle.emit(Failed("deadline", "the request did not finish before its deadline; retry, or ask for fewer "
                                           "tokens"))
            return True
        return False

    def _prefill(self) -> None:
        """Prompts that fit the budget are prefilled together in one pass; a longer one goes chunk by chunk."""
        budget = self.prefill_chunk
        while True:
            idle = not any(group.rows for group in self.groups)  # nobody to stall: finish what was started
            allowance = max(budget, self.prefill_chunk) if idle else budget
            if allowance <= 0:
                return
            if self._prefilling is not None:
                budget -= self._prefill_some(self._prefilling, allowance)
                continue
            together = self._in_prefill = self._admit(allowance)
            if not together:
                return
            budget -= self._prefill_together(together)
            self._in_prefill = []

    def _admit(self, allowance: int) -> list[_Pending]:
        """Waiting requests (first come, first served) for one model group whose prompts fit `allowance` tokens
        and whose choices fit the batch; a first prompt longer than that becomes the chunked `_prefilling`."""
        running = sum(len(group.rows) for group in self.groups)
        chosen, tokens = [], 0
        with self._wakeup:
            while self._waiting:
                request = self._waiting[0].request
                group = self.routes[request.model].group
                if running + request.n > self.max_batch or (chosen and group is not chosen[0].route.group):
                    break
                if chosen and tokens + len(request.prompt_ids) > allowance:
                    break
                handle = self._waiting.popleft()
                running += request.n
                tokens += len(request.prompt_ids)
                chosen.append(self._pending(handle))
        if len(chosen) == 1 and len(chosen[0].handle.request.prompt_ids) - chosen[0].done > allowance:
            self._prefilling = chosen.pop()
        return chosen

    def _pending(self, handle: RequestHandle) -> _Pending:
        route = self.routes[handle.request.model]
        cache = new_cache(route.group.model)
        reused = self.prefixes.lookup((route.group.key, route.adapter), handle.request.prompt_ids, cache)
        return _Pending(handle, route, cache, done=reused)

    def _prefill_some(self, pending: _Pending, budget: int) -> int:
        """One chunk of a long prompt, in its own cache; the last chunk makes its rows join the batch."""
        import torch

        prompt, route = pending.handle.request.prompt_ids, pending.route
        chunk = prompt[pending.done:pending.done + max(1, budget)]
        ids = torch.tensor([chunk], dtype=torch.long, device=route.group.device)
        output = route.group.forward(ids, [route.adapter], past_key_values=pending.cache, logits_to_keep=1)
        pending.done += len(chunk)
        if pending.done == len(prompt):
            self._join_prefilled(route.group, [pending], output.logits[:, -1])
            self._prefilling = None  # only now: should joining fail, its request fails with the rest
        return len(chunk)

    def _prefill_together(self, together: list[_Pending]) -> int:
        """Every prompt's remaining tokens in one padded pass (after the prefixes the prefix cache supplied)."""
        group = together[0].route.group
        prompts = [pending.handle.request.prompt_ids for pending in together]
        batch = PaddedBatch.of_prefixes(group.model, [p.cache for p in together], [p.done for p in together])
        inputs = batch.prefill_inputs([prompt[p.done:] for prompt, p in zip(prompts, together)])
        output = group.forward(inputs.pop("input_ids"), [p.route.adapter for p in together], logits_to_keep=1,
                               **inputs)
        for row, (pending, prompt) in enumerate(zip(together, prompts)):
            # A copy: the batch's buffers are written in place as rows come and go.
            self.prefixes.store((group.key, pending.route.adapter), prompt, batch.row_cache(row, group.model))
        self._join(group, batch, together, output.logits[:, -1])
        return sum(len(prompt) - p.done for prompt, p in zip(prompts, together))

    def _group_to_fuse(self) -> ModelGroup | None:
        """The group whose decode pass also prefills this step: the one the next prompt goes to, when it has
        running rows and its model fuses steps."""
        if self._prefilling is not None:
            group = self._prefilling.route.group
        else:
            with self._wakeup:
                if not self._waiting:
                    return None
                group = self.routes[self._waiting[0].request.model].group
        return group if group.rows and group.fuses else None

    def _decode_and_prefill(self, group: ModelGroup) -> None:
        """One pass: a token for every running row of `group`, and the next prompts' tokens (within the prefill
        budget) after them; prompts prefilled to their end join the batch (see fused_step)."""
        import torch

        if self._prefilling is None:
            self._in_prefill = self._admit(self.prefill_chunk)
        parts = [(p, p.handle.request.prompt_ids[p.done:]) for p in self._in_prefill]
        if self._prefilling is not None:
            pending = self._prefilling
            parts = [(pending, pending.handle.request.prompt_ids[pending.done:pending.done + self.prefill_chunk])]
        if not parts:  # nothing admitted (the batch is full)
            self._decode(group)
            return
        rows, batch = group.rows, group.batch
        inputs = batch.step_inputs()
        padded = None if bool(inputs["attention_mask"].all()) else inputs["attention_mask"]
        step = FusedStep(len(rows), batch.cache, padded, [Segment(p.cache, p.done, len(tokens)) for p, tokens in parts])
        ids = [row.last_token for row in rows] + [token for _, tokens in parts for token in tokens]
        positions = batch.positions.tolist() + [p.done + i for p, tokens in parts for i in range(len(tokens))]
        adapters = [row.route.adapter for row in rows] + [p.route.adapter for p, tokens in parts for _ in tokens]
        ends = list(itertools.accumulate([len(rows)] + [len(tokens) for _, tokens in parts]))
        finishing = [i for i, (p, tokens) in enumerate(parts)
                     if p.done + len(tokens) == len(p.handle.request.prompt_ids)]
        keep = list(range(len(rows))) + [ends[i + 1] - 1 for i in finishing]
        device = group.device
        output = group.forward_fused(step, torch.tensor([ids], device=device), adapters,
                                     torch.tensor([positions], device=device), torch.tensor(keep, device=device))
        batch.advance()
        logits = output.logits[0]
        self._accept_decoded(group, logits[:len(rows)])
        for pending, tokens in parts:
            pending.done += len(tokens)
        joining = [parts[i][0] for i in finishing]
        if joining:
            self._join_prefilled(group, joining, logits[len(rows):])
            if self._prefilling is not None:  # only now: should joining fail, its request fails with the rest
                self._prefilling = None
        self._in_prefill = []

    def _join_prefilled(self, group: ModelGroup, pendings: list[_Pending], logits) -> None:
        """Prompts whose own caches now hold all their tokens: remembered by the prefix cache, then joined."""
        for pending in pendings:
            self.prefixes.store((group.key, pending.route.adapter), pending.handle.request.prompt_ids, pending.cache)
        lengths = [len(pending.handle.request.prompt_ids) for pending in pendings]
        self._join(group, PaddedBatch.of_prefixes(group.model, [p.cache for p in pendings], lengths), pendings, logits)

    def _join(self, group: ModelGroup, batch: PaddedBatch, pendings: list[_Pending], logits) -> None:
        """The prompts are in `batch`: choose each choice's first token, then the unfinished choices join the
        group's running batch (a prompt with n choices becomes n rows sharing its cache)."""
        joining, keep = [], []
        for index, pending in enumerate(pendings):
            rows = [self._new_row(pending.handle, pending.route, choice) for choice in range(pending.handle.request.n)]
            finished = self._choose_and_accept(rows, logits[index].unsqueeze(0).expand(len(rows), -1))
            for row, done in zip(rows, finished):
                if not done:
                    joining.append(row)
                    keep.append(index)
        if joining:
            batch.keep(keep)
            group.batch.merge(batch)
            group.rows.extend(joining)

    def _new_row(self, handle: RequestHandle, route: Route, index: int) -> _Row:
        request = handle.request
        seed = None if request.params.seed is None else request.params.seed + index
        return _Row(handle, index, route, TextStream(route.decoder, request.params.stop),
                    seeded_generator(seed, route.group.device) if request.params.temperature else None,
                    request.constraint() if request.constraint else None, len(request.prompt_ids))

    def _decode(self, group: ModelGroup) -> None:
        import torch

        inputs = group.batch.step_inputs()
        ids = torch.tensor([[row.last_token] for row in group.rows], dtype=torch.long, device=group.device)
        output = group.forward(ids, [row.route.adapter for row in group.rows], **inputs)
        group.batch.advance()
        self._accept_decoded(group, output.logits[:, -1])

    def _accept_decoded(self, group: ModelGroup, logits) -> None:
        """Each running row's next token from its row of `logits`; finished rows leave the batch."""
        finished = self._choose_and_accept(group.rows, logits)
        if any(finished):
            order = group.batch.remove([i for i, done in enumerate(finished) if done])
            group.rows = [group.rows[i] for i in order]

    def _choose_and_accept(self, rows: list[_Row], logits) -> list[bool]:
        """Pick a token for every row (grammar-masked where asked), hand each to its row; which rows finished."""
        matchers = [row.matcher for row in rows]
        chosen_from = logits
        if any(m is not None for m in matchers):
            chosen_from = logits.float().clone()
            mask_logits(chosen_from, matchers)
        tokens = choose_tokens(chosen_from, [row.params.temperature for row in rows],
                               [row.params.top_p for row in rows], [row.generator for row in rows])
        finished = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            top = row.params.logprobs
            logprob = None if top is None else token_logprobs(logits[i], token, top, row.route.describe)
            finished.append(row.accept(token, logprob))
        return finished

    def _fail_pending(self, exc: Exception) -> None:
        """A prefill pass failed: its requests fail (those taken from the queue are no longer anywhere else)."""
        if self._prefilling is not None:
            self._prefilling.handle.emit(Failed("error", f"generation failed: {type(exc).__name__}: {exc}"))
            self._prefilling = None
        for pending in self._in_prefill:
            pending.handle.emit(Failed("error", f"generation failed: {type(exc).__name__}: {exc}"))
        self._in_prefill = []

    def _fail_group(self, group: ModelGroup, exc: Exception) -> None:
        for handle in {id(row.handle): row.handle for row in group.rows}.values():
            handle.emit(Failed("error", f"generation failed: {type(exc).__name__}: {exc}"))
        group.rows, group.batch = [], PaddedBatch()


def _run_into(fn: Callable[[], object], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # the caller waiting on the future decides what it means
        future.set_exception(exc)
