"""The served models behind the batching engine: turns OpenAI requests into generation requests and back, and
changes what is served while it runs (a registry alias that moved, a version loaded or unloaded).

A served name (`orders@production`) maps to an engine name, the version itself (`orders@3`); plans carry the engine
name, so a request keeps the version it was planned with while the name moves on. A version nothing maps to any
more is dropped once no request uses it.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from tunesmith.data.template import generation_prompt_ids
from tunesmith.errors import TunesmithError
from tunesmith.generation.constraints import GrammarCompiler
from tunesmith.generation.engine import BatchingEngine, RequestHandle
from tunesmith.generation.passing_thread import in_passing_thread
from tunesmith.generation.requests import ChoiceUpdate, Event, Failed, GenerationRequest, SamplingParams
from tunesmith.machine import return_freed_memory
from tunesmith.serve.loading import ModelLoader, ServedModel
from tunesmith.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ResponseFormat
from tunesmith.serve.targets import ServedTarget, resolve_target, resolve_targets


class ModelNotFound(TunesmithError):
    """A request named a model this server does not serve."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(f"model {name!r} not found; this server serves: {', '.join(available)}")


class GenerationFailed(TunesmithError):
    """The engine dropped the request: `reason` "deadline" (a 503 with Retry-After) or "error" (a 500)."""

    def __init__(self, failure: Failed):
        super().__init__(failure.message)
        self.reason = failure.reason


class StreamDelta(NamedTuple):
    """A piece of choice 0's reply; the last one carries `finish_reason` ("stop" or "length")."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Completion(NamedTuple):
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class ServingEngine:
    """Served names (fine-tuned versions first, then bases) over one `BatchingEngine`."""

    def __init__(self, models: dict[str, ServedModel], default_max_tokens: int = 256, max_batch: int = 32,
                 max_waiting: int = 64, request_timeout: float | None = None, loader: ModelLoader | None = None,
                 aliases: Iterable[str] = ()):
        self.versions = {model.name: model for model in models.values()}
        """Engine name -> loaded version, those being dropped included."""
        self.names = {name: model.name for name, model in models.items()}
        """Served name -> engine name."""
        self.aliases = set(aliases)
        """Served names that follow a registry alias (`refresh_aliases` moves them)."""
        self.loader = loader or ModelLoader()
        self.default_max_tokens, self.request_timeout = default_max_tokens, request_timeout
        self.batching = BatchingEngine({name: model.route for name, model in self.versions.items()}, max_batch,
                                       max_waiting)
        self._compilers: dict[int, tuple[object, GrammarCompiler]] = {}  # holding the tokenizer keeps its id
        self._tokenizing = threading.Lock()  # a fast tokenizer must not encode in two threads at once
        self._changing = threading.Lock()  # one load, unload or alias switch at a time
        self._retiring: set[str] = set()
        self._planned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # plans not yet let go of
        self._planned_lock = threading.Lock()
        self._planning_now: Counter[str] = Counter()
        self._started = False

    @classmethod
    def from_targets(cls, targets: list[ServedTarget], serve_base: bool = True, device: str | None = None,
                     precision: str = "fp32", **settings) -> ServingEngine:
        """`precision`: fp32, bf16, or auto (bf16 where the CPU or GPU computes it natively)."""
        loader = ModelLoader(device, precision)
        loaded = in_passing_thread(lambda: loader.load_targets(targets, serve_base))  # see passing_thread
        return_freed_memory()
        return cls(loaded, loader=loader,
                   aliases=[target.name for target in targets if target.follows_alias], **settings)

    @classmethod
    def from_references(cls, references: list[str], serve_base: bool = True, **settings) -> ServingEngine:
        """Run directories and registry references (NAME@VERSION, NAME@ALIAS), resolved and verified."""
        return cls.from_targets(resolve_targets(references), serve_base, **settings)

    @classmethod
    def from_run_dir(cls, run_dir: Path | str, default_max_tokens: int = 256, device: str | None = None):
        """One run (its adapter or fully fine-tuned model) and its base."""
        return cls.from_references([str(run_dir)], device=device, default_max_tokens=default_max_tokens)

    # --- what is served ----------------------------------------------------------------------------------------

    @property
    def models(self) -> dict[str, ServedModel]:
        """Served name -> the version it serves now (a snapshot)."""
        pairs = [(name, self.versions.get(engine_name)) for name, engine_name in list(self.names.items())]
        return {name: version for name, version in pairs if version is not None}

    def list_models(self) -> list[str]:
        """Served names: fine-tuned versions first, then bases."""
        models = self.models
        return sorted(models, key=lambda name: models[name].parent is None)

    def model_cards(self) -> list[ModelCard]:
        models = self.models
        return [ModelCard(id=name, parent=models[name].parent, root=models[name].root,
                          max_model_len=models[name].context_length) for name in self.list_models() if name in models]

    def check_model(self, model_name: str) -> ServedModel:
        """The version a served name serves now, or ModelNotFound (a 404 in the API)."""
        served = self.versions.get(self.names.get(model_name, ""))
        if served is None:
            raise ModelNotFound(model_name, self.list_models())
        return served

    def served_version(self, name: str) -> tuple[str | None, str | None]:
        """(registered model, version) a served name serves now; (None, None) for run directories and bases."""
        served = self.versions.get(self.names.get(name, ""))
        return (served.registry_model, served.registry_version) if served else (None, None)

    @property
    def adapter_name(self) -> str | None:
        """The first fine-tuned version's name (one-run servers)."""
        return next((name for name in self.list_models() if self.models[name].parent), None)

    @property
    def tokenizer(self):
        """The first served model's tokenizer (one-run servers)."""
        return self.models[self.list_models()[0]].tokenizer

    @property
    def base_name(self) -> str | None:
        return next((name for name in self.list_models() if self.models[name].parent is None), None)

    # --- requests ------------------------------------------------------------------------------------------------

    def plan_chat(self, request: ChatCompletionRequest) -> GenerationRequest:
        """The generation request for a chat completion; a bad request raises here (a 4xx in the API)."""
        with self._planning(request.model) as served:
            return self._chat_plan(served, request)

    def plan_completion(self, request: CompletionRequest) -> list[GenerationRequest]:
        """One generation request per prompt of a text completion (strings are tokenized as text, never as
        control tokens; a list of token ids is taken as it is)."""
        with self._planning(request.model) as served:
            return self._completion_plans(served, request)

    def _chat_plan(self, served: ServedModel, request: ChatCompletionRequest) -> GenerationRequest:
        from jinja2 import TemplateError

        with self._tokenizing:
            try:
                prompt = generation_prompt_ids(served.tokenizer, [m.model_dump() for m in request.messages])
            except TemplateError as exc:
                raise TunesmithError(f"messages: the model's chat template rejected them ({exc})") from None
        constraint = self._constraint(served, request.response_format)
        return self._plan(served, prompt, request, request.token_limit(self.default_max_tokens),
                          request.logprobs_wanted(), constraint, "messages")

    def _completion_plans(self, served: ServedModel, request: CompletionRequest) -> list[GenerationRequest]:
        plans = []
        for index, prompt in enumerate(request.prompts()):
            where = "prompt" if len(request.prompts()) == 1 else f"prompt[{index}]"
            if isinstance(prompt, str):
                with self._tokenizing:
                    ids = served.tokenizer(prompt, split_special_tokens=True)["input_ids"]
            else:
                ids = self._checked_ids(served, prompt, where)
            if not ids:
                raise TunesmithError(f"{where}: empty; send some text")
            plans.append(self._plan(served, ids, request, request.token_limit(self.default_max_tokens),
                                    request.logprobs, None, where))
        return plans

    def submit(self, plan: GenerationRequest, emit: Callable[[Event], None]) -> RequestHandle:
        """Queue a planned request (EngineBusy when the queue is full); events reach `emit` from the engine."""
        self.start()
        handle = self.batching.submit(plan, emit)
        with self._planned_lock:
            self._planned.pop(id(plan), None)  # queued: the engine itself now keeps its version until it is done
        return handle

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.batching.start()

    def stop(self) -> None:
        self.batching.stop()

    # --- changing what is served while serving -------------------------------------------------------------------

    def load(self, reference: str, name: str | None = None) -> str:
        """Serve a run directory or registry reference (NAME@VERSION, NAME@ALIAS) under its name, or under `name` (a
        fine-tuning job's `ft:...` model); the served name. Loading what is served already is a no-op; a served
        alias moves to the version it names now."""
        target = resolve_target(reference)
        follows = target.follows_alias and name is None
        target = replace(target, name=name) if name else target
        with self._changing:
            current = self.names.get(target.name)
            if current is not None and current != target.engine_name and not follows:
                raise TunesmithError(f"{reference}: the name {target.name!r} already serves {current}; unload it "
                                     "first")
            self._switch(target.name, target)
            if follows:
                self.aliases.add(target.name)
        return target.name

    def unload(self, name: str) -> None:
        """Stop serving a name: new requests get ModelNotFound at once, those in flight finish, then its version is
        freed (unless another name serves it)."""
        with self._changing:
            engine_name = self.names.pop(name, None)
            if engine_name is None:
                raise ModelNotFound(name, self.list_models())
            self.aliases.discard(name)
            self._retire_if_unused(engine_name)

    def refresh_aliases(self) -> list[str]:
        """Move every served alias whose registry alias now names another version to that version; what changed
        (and what could not, in which case the old version keeps serving), one line each. Never raises."""
        from tunesmith.registry.store import Registry

        if not self.aliases:
            return []
        try:
            registry = Registry()
        except Exception as exc:  # an unreachable store must not stop the watcher: the next check tries again
            return [f"registry aliases not checked: {exc}"]
        changes = []
        for name in sorted(self.aliases):
            current, wanted = self.names.get(name), None
            try:
                wanted = "@".join(registry.resolve(name))
                if wanted == current:
                    continue
                target = resolve_target(wanted)
                with self._changing:
                    if name not in self.aliases:  # unloaded meanwhile
                        continue
                    self._switch(name, target)
                changes.append(f"{name}: now serves {wanted} (was {current})")
            except Exception as exc:  # bad weights, a registry error or our bug: the old version keeps serving
                changes.append(f"{name}: still serves {current}; could not switch to {wanted or 'its new version'} "
                               f"({exc})")
        return changes

    def _switch(self, name: str, target: ServedTarget) -> None:
        """Point `name` at the target's version (loading it if needed), then let its old version go."""
        engine_name = self._ensure_loaded(target)
        previous = self.names.get(name)
        self.names[name] = engine_name
        if previous is not None and previous != engine_name:
            self._retire_if_unused(previous)

    def _ensure_loaded(self, target: ServedTarget) -> str:
        engine_name = target.engine_name
        loaded = self.versions.get(engine_name)
        if loaded is not None and loaded.root != str(target.run_dir):
            raise TunesmithError(f"{target.run_dir}: another run named {engine_name!r} is served already (from "
                                 f"{loaded.root}); unload it first, or register this run under another name")
        if loaded is not None and engine_name not in self._retiring:
            return engine_name
        if loaded is not None and self.batching.keep_route(engine_name).result():
            self._retiring.discard(engine_name)
            return engine_name
        version, prepare = in_passing_thread(lambda: self.loader.load_version(target))
        self.batching.add_route(engine_name, version.route, prepare).result()
        return_freed_memory()
        self.versions[engine_name] = version
        return engine_name

    def _retire_if_unused(self, engine_name: str) -> None:
        if engine_name in self.names.values():
            return
        self._retiring.add(engine_name)
        self.batching.retire_route(engine_name, held=partial(self._is_planned, engine_name),
                                   then=partial(self._release, engine_name))

    @contextmanager
    def _planning(self, model_name: str) -> Iterator[ServedModel]:
        """The version a served name serves now, kept from being dropped while plans are made for it."""
        with self._planned_lock:  # with `_is_planned`: a version is never dropped between lookup and plan
            served = self.check_model(model_name)
            self._planning_now[served.name] += 1
        try:
            yield served
        finally:
            with self._planned_lock:
                self._planning_now[served.name] -= 1

    def _is_planned(self, engine_name: str) -> bool:
        """Plans are being made for this version, or one made is still held by its caller, not yet submitted."""
        with self._planned_lock:
            return (self._planning_now[engine_name] > 0
                    or any(plan.model == engine_name for plan in list(self._planned.values())))

    def _release(self, engine_name: str) -> None:
        """On the engine thread, once the version's route is dropped."""
        version = self.versions.get(engine_name)
        if version is not None:
            still_served = any(group is version.route.group for group in self.batching.groups)
            self.loader.release(version.route, still_served)
        self.versions.pop(engine_name, None)
        self._retiring.discard(engine_name)

    # --- in-process use (chat CLI, tests) ---------------------------------------------------------------------

    def stream(self, request: ChatCompletionRequest) -> Iterator[StreamDelta]:
        """Choice 0's reply as it is generated; request errors raise here, before the first token."""
        events: queue.Queue = queue.Queue()
        handle = self.submit(self.plan_chat(request), events.put)
        return _deltas(events, handle)

    def generate(self, request: ChatCompletionRequest) -> Completion:
        parts, last = [], None
        for last in self.stream(request):
            parts.append(last.text)
        return Completion("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens)

    # --- helpers -------------------------------------------------------------------------------------------------

    def _plan(self, served: ServedModel, prompt: list[int], request, max_tokens: int, logprobs: int | None,
              constraint, where: str) -> GenerationRequest:
        if request.n > self.batching.max_batch:
            raise TunesmithError(f"n: {request.n} choices do not fit in this server's batch of "
                                 f"{self.batching.max_batch}; ask for fewer")
        if served.context_length:
            room = served.context_length - len(prompt)
            if room < 1:
                raise TunesmithError(f"{where}: the prompt is {len(prompt)} tokens but the model's context is "
                                     f"{served.context_length}; shorten it")
            max_tokens = min(max_tokens, room)
        params = SamplingParams(max_tokens, request.temperature or 0.0, request.top_p or 1.0, request.seed,
                                request.stop_strings(), logprobs)
        deadline = time.monotonic() + self.request_timeout if self.request_timeout else None
        plan = GenerationRequest(served.name, prompt, params, request.n, constraint, deadline)
        with self._planned_lock:
            self._planned[id(plan)] = plan
        return plan

    def _constraint(self, served: ServedModel, response_format: ResponseFormat | None):
        if response_format is None or response_format.type == "text":
            return None
        if id(served.tokenizer) not in self._compilers:
            self._compilers[id(served.tokenizer)] = (served.tokenizer,
                                                     GrammarCompiler(served.tokenizer, served.route.group.vocab_size))
        compiler = self._compilers[id(served.tokenizer)][1]
        if response_format.type == "json_object":
            return compiler.any_json_object()
        return compiler.json_schema(response_format.json_schema.schema_)

    @staticmethod
    def _checked_ids(served: ServedModel, ids: list[int], where: str) -> list[int]:
        vocab = served.route.group.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise TunesmithError(f"{where}: token id {bad} is outside the vocabulary (0..{vocab - 1})")
        return list(ids)


def _deltas(events: queue.Queue, handle: RequestHandle) -> Iterator[StreamDelta]:
    try:
        while True:
            event = events.get()
            if isinstance(event, Failed):
                raise GenerationFailed(event)
            if isinstance(event, ChoiceUpdate) and event.index == 0:
                yield StreamDelta(event.text, event.finish_reason, event.prompt_tokens, event.completion_tokens)
                if event.finish_reason:
                    return
    finally:
        handle.cancel()
