"""Greedy answers for many conversations at once (evaluation, self-distillation), through the same continuous-batching
engine that serves requests."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.template import generation_prompt_ids
from tunesmith.generation.engine import BatchingEngine, ModelGroup, Route
from tunesmith.generation.requests import ChoiceUpdate, GenerationRequest, SamplingParams

PREFILL_CHUNK = 1024  # batch generation wants throughput, not a short time to first token


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool
    """True when the model emitted an end-of-turn token; False when it ran into the token limit."""


def generate_batched(model, tokenizer, conversations: list[list[dict]], stop_ids: list[int],
                     max_new_tokens: int, batch_size: int, on_batch=None,
                     tools: list[list[dict] | None] | None = None) -> list[Generation]:
    """Greedy answers for each conversation (offered its `tools`, if any), in input order; up to `batch_size`
    are decoded together and a finished answer's place goes to the next prompt at once."""
    from tokenizers import Tokenizer

    tools = tools or [None] * len(conversations)
    prompts = [generation_prompt_ids(tokenizer, messages, offered) for messages, offered in zip(conversations, tools)]
    route = Route(ModelGroup(model), None, frozenset(stop_ids),
                  Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    engine = BatchingEngine({"model": route}, max_batch=batch_size, max_waiting=len(prompts) + 1,
                            prefill_chunk=PREFILL_CHUNK)
    texts: list[list[str]] = [[] for _ in prompts]
    results: list[Generation | None] = [None] * len(prompts)

    def listener(index: int):
        def emit(update: ChoiceUpdate) -> None:
            texts[index].append(update.text)
            if update.finish_reason:
                results[index] = Generation("".join(texts[index]).strip(), update.completion_tokens,
                                            update.finish_reason == "stop")
                if on_batch:
                    on_batch(1)
        return emit

    # Similar lengths side by side waste less padding.
    for index in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        request = GenerationRequest("model", prompts[index], SamplingParams(max_tokens=max_new_tokens))
        engine.submit(request, listener(index))
    engine.run_until_done()
    return results
