"""The served models behind the batching engine: turns OpenAI requests into generation requests and back."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from tunesmith.data.template import generation_prompt_ids
from tunesmith.errors import TunesmithError
from tunesmith.generation.constraints import GrammarCompiler
from tunesmith.generation.engine import BatchingEngine, RequestHandle
from tunesmith.generation.requests import ChoiceUpdate, Event, Failed, GenerationRequest, SamplingParams
from tunesmith.serve.loading import ServedModel, load_served_models
from tunesmith.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ResponseFormat
from tunesmith.serve.targets import ServedTarget, resolve_targets


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
                 max_waiting: int = 64, request_timeout: float | None = None):
        self.models = models
        self.default_max_tokens, self.request_timeout = default_max_tokens, request_timeout
        self.batching = BatchingEngine({name: model.route for name, model in models.items()}, max_batch, max_waiting)
        self._compilers: dict[int, GrammarCompiler] = {}
        self._tokenizing = threading.Lock()  # a fast tokenizer must not encode in two threads at once
        self._started = False

    @classmethod
    def from_targets(cls, targets: list[ServedTarget], serve_base: bool = True, device: str | None = None,
                     **settings) -> ServingEngine:
        return cls(load_served_models(targets, serve_base, device), **settings)

    @classmethod
    def from_references(cls, references: list[str], serve_base: bool = True, **settings) -> ServingEngine:
        """Run directories and registry references (NAME@VERSION, NAME@ALIAS), resolved and verified."""
        return cls.from_targets(resolve_targets(references), serve_base, **settings)

    @classmethod
    def from_run_dir(cls, run_dir: Path | str, default_max_tokens: int = 256, device: str | None = None):
        """One run (its adapter or fully fine-tuned model) and its base."""
        return cls.from_references([str(run_dir)], device=device, default_max_tokens=default_max_tokens)

    # --- what is served ----------------------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        """Served names: fine-tuned versions first, then bases."""
        return sorted(self.models, key=lambda name: self.models[name].parent is None)

    def model_cards(self) -> list[ModelCard]:
        return [ModelCard(id=name, parent=self.models[name].parent, root=self.models[name].root,
                          max_model_len=self.models[name].context_length) for name in self.list_models()]

    def check_model(self, model_name: str) -> ServedModel:
        """The served model, or ModelNotFound (a 404 in the API)."""
        if model_name not in self.models:
            raise ModelNotFound(model_name, self.list_models())
        return self.models[model_name]

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
        from jinja2 import TemplateError

        served = self.check_model(request.model)
        with self._tokenizing:
            try:
                prompt = generation_prompt_ids(served.tokenizer, [m.model_dump() for m in request.messages])
            except TemplateError as exc:
                raise TunesmithError(f"messages: the model's chat template rejected them ({exc})") from None
        constraint = self._constraint(served, request.response_format)
        return self._plan(served, prompt, request, request.token_limit(self.default_max_tokens),
                          request.logprobs_wanted(), constraint, "messages")

    def plan_completion(self, request: CompletionRequest) -> list[GenerationRequest]:
        """One generation request per prompt of a text completion (strings are tokenized as text, never as
        control tokens; a list of token ids is taken as it is)."""
        served = self.check_model(request.model)
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
        return self.batching.submit(plan, emit)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.batching.start()

    def stop(self) -> None:
        self.batching.stop()

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
        return GenerationRequest(request.model, prompt, params, request.n, constraint, deadline)

    def _constraint(self, served: ServedModel, response_format: ResponseFormat | None):
        if response_format is None or response_format.type == "text":
            return None
        compiler = self._compilers.get(id(served.tokenizer))
        if compiler is None:
            compiler = GrammarCompiler(served.tokenizer, served.route.group.vocab_size)
            self._compilers[id(served.tokenizer)] = compiler
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
