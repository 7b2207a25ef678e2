"""One process serving two names, the trained adapter (or fully fine-tuned model) and its base, a request at a time."""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from tunesmith.data.template import end_of_turn_token_ids, generation_prompt_ids
from tunesmith.errors import TunesmithError
from tunesmith.models import DEFAULT_MODEL_NAME, answering_as, load_model, load_tokenizer, load_with_adapter
from tunesmith.registry.run import Run
from tunesmith.serve.protocol import ChatCompletionRequest

ADAPTER_NAME = "adapter"  # the name `load_with_adapter` registers the LoRA weights under


class ModelNotFound(TunesmithError):
    """A request named a model this server does not serve."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(f"model {name!r} not found; this server serves: {', '.join(available)}")


class StreamDelta(NamedTuple):
    """A piece of the reply; the last one of a stream carries `finish_reason` ("stop" or "length")."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Completion(NamedTuple):
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class _Plan:
    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stops: list[str]


def served_base_name(base_model: str) -> str:
    """The public name of the base model: the default's real name, else the folder or Hub repo name."""
    if base_model == "default":
        return DEFAULT_MODEL_NAME
    return Path(base_model.rstrip("/")).name or base_model


class ServingEngine:
    """Generates chat replies from the base model, or the base with the run's adapter switched on, or the run's
    fully fine-tuned model (`tuned_model`, loaded beside the base)."""

    def __init__(self, model, tokenizer, base_name: str, adapter_name: str | None, default_max_tokens: int = 256,
                 tuned_model=None):
        self.model = model
        self.tuned_model = tuned_model
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.adapter_name = adapter_name
        self.default_max_tokens = default_max_tokens
        self.stop_ids = set(end_of_turn_token_ids(tokenizer))
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()

    @classmethod
    def from_run_dir(cls, run_dir: Path | str, default_max_tokens: int = 256, device: str | None = None):
        """Load a run's base model and adapter (base alone if the run is not trained), checking the chat template."""
        import torch

        run_dir = Path(run_dir)
        run = Run.open(run_dir)
        base_source, trained = run.base_source, run.is_trained
        weights_dir = run.weights_dir if trained else None
        if trained:
            run.verify_weights()
        full = trained and run.is_full_fine_tune
        marker = "config.json" if full else "adapter_config.json"
        if weights_dir is not None and not (weights_dir / marker).is_file():
            raise TunesmithError(f"{weights_dir}: no {marker}; re-run `tunesmith train` for this run")
        # The trained folder holds the tokenizer training used, so the template is exactly the trained one.
        tokenizer = load_tokenizer(weights_dir or base_source)
        run.check_template(tokenizer, whose=f"the model in {weights_dir or base_source}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        adapter = weights_dir is not None and not full
        model = load_with_adapter(base_source, weights_dir) if adapter else load_model(base_source)
        model.to(device)
        tuned_model = load_model(weights_dir).to(device) if full else None
        base_name = served_base_name(run.manifest.base_model.name)
        adapter_name = run.name if trained else None
        if adapter_name == base_name:
            base_name += "-base"
        return cls(model, tokenizer, base_name, adapter_name, default_max_tokens, tuned_model)

    def list_models(self) -> list[str]:
        """Served model names, the adapter (if any) first."""
        return [name for name in (self.adapter_name, self.base_name) if name]

    @contextmanager
    def using(self, model_name: str):
        """Hold the generation lock with `model_name`'s weights active; yields the torch model."""
        self.check_model(model_name)
        tuned = model_name == self.adapter_name
        if tuned and self.tuned_model is not None:
            weights = answering_as(self.model, own_model=self.tuned_model)
        else:
            weights = answering_as(self.model, ADAPTER_NAME if tuned else None)
        with self._lock, weights as model:
            yield model

    def generate(self, request: ChatCompletionRequest) -> Completion:
        """The whole reply at once: (text, finish_reason, prompt_tokens, completion_tokens)."""
        parts = []
        for delta in self.stream(request):
            parts.append(delta.text)
        return Completion("".join(parts), delta.finish_reason, delta.prompt_tokens, delta.completion_tokens)

    def stream(self, request: ChatCompletionRequest) -> Iterator[StreamDelta]:
        """Reply deltas as tokens are generated; request errors raise here, before the first token."""
        plan = self._plan(request)
        deltas: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        # Decoding runs in its own thread so the lock is always released, even if the reader walks away.
        threading.Thread(target=self._produce, args=(plan, deltas, cancelled), daemon=True).start()
        return _consume(deltas, cancelled)

    def check_model(self, model_name: str) -> None:
        """Raise ModelNotFound (a 404 in the API) unless this engine serves `model_name`."""
        if model_name not in self.list_models():
            raise ModelNotFound(model_name, self.list_models())

    def _plan(self, request: ChatCompletionRequest) -> _Plan:
        from jinja2 import TemplateError

        self.check_model(request.model)
        try:
            prompt_ids = generation_prompt_ids(self.tokenizer, [m.model_dump() for m in request.messages])
        except TemplateError as exc:
            raise TunesmithError(f"messages: the model's chat template rejected them ({exc})") from None
        max_tokens = request.token_limit(self.default_max_tokens)
        if self.context_length:
            room = self.context_length - len(prompt_ids)
            if room < 1:
                raise TunesmithError(f"messages: the prompt is {len(prompt_ids)} tokens but the model's context is "
                                     f"{self.context_length}; shorten the conversation")
            max_tokens = min(max_tokens, room)
        return _Plan(request.model, prompt_ids, max_tokens, request.temperature or 0.0, request.top_p,
                     request.seed, request.stop_strings())

    def _produce(self, plan: _Plan, deltas: queue.Queue, cancelled: threading.Event) -> None:
        try:
            for delta in self._decode(plan, cancelled):
                deltas.put(delta)
        except BaseException as exc:  # handed to the reader, which re-raises it in its own thread
            deltas.put(exc)

    def _decode(self, plan: _Plan, cancelled: threading.Event) -> Iterator[StreamDelta]:
        import torch

        generator = _sampling_generator(plan.seed) if plan.temperature else None
        device = next(self.model.parameters()).device
        prompt_tokens, sampled, kept = len(plan.prompt_ids), 0, []
        text, emitted, finish = "", 0, "length"
        inputs, cache = torch.tensor([plan.prompt_ids], device=device), None
        with self.using(plan.model) as model, torch.inference_mode():
            while sampled < plan.max_tokens:
                if cancelled.is_set():
                    return
                output = model(input_ids=inputs, past_key_values=cache, use_cache=True)
                cache = output.past_key_values
                token = _pick_token(output.logits[0, -1], plan.temperature, plan.top_p, generator)
                sampled += 1
                if token in self.stop_ids:
                    finish = "stop"
                    break
                kept.append(token)
                # Decoding the whole reply each step keeps multi-token characters and leading spaces right.
                text = self.tokenizer.decode(kept, skip_special_tokens=True)
                cut = _first_stop(text, plan.stops)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                ready = _emittable_length(text, plan.stops)
                if ready > emitted:
                    yield StreamDelta(text[emitted:ready], None, prompt_tokens, sampled)
                    emitted = ready
                inputs = torch.tensor([[token]], device=device)
        yield StreamDelta(text[emitted:], finish, prompt_tokens, sampled)


def _consume(deltas: queue.Queue, cancelled: threading.Event) -> Iterator[StreamDelta]:
    try:
        while True:
            item = deltas.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return
    finally:
        cancelled.set()


def _sampling_generator(seed: int | None):
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()  # a fresh random seed; torch.Generator() alone always starts from the same one
    else:
        generator.manual_seed(seed)
    return generator


def _pick_token(logits, temperature: float, top_p: float | None, generator) -> int:
    """Greedy when temperature is 0, else a sample from the temperature-scaled nucleus of `top_p`."""
    import torch

    if not temperature:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    ranked, order = probs.sort(descending=True)
    if top_p is not None and top_p < 1:
        ranked = ranked * ((ranked.cumsum(0) - ranked) < top_p)  # always keeps the most likely token
    return int(order[torch.multinomial(ranked, 1, generator=generator)])


def _first_stop(text: str, stops: list[str]) -> int:
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found, default=-1)


def _emittable_length(text: str, stops: list[str]) -> int:
    """How much of `text` is final: hold back an unfinished character and anything that may begin a stop string."""
    end = len(text.rstrip("\ufffd"))  # an incomplete multi-byte character decodes as U+FFFD until it completes
    head = text[:end]
    held = max((k for stop in stops for k in range(1, min(len(stop), end + 1)) if head.endswith(stop[:k])),
               default=0)
    return end - held
