"""Answers for many conversations at once (evaluation, self-distillation, mined preference pairs), greedy or sampled,
through the same continuous-batching engine that serves requests."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.template import generation_prompt_ids
from tunesmith.generation.engine import BatchingEngine, Route
from tunesmith.generation.model_group import ModelGroup
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
    answers = sample_batched(model, tokenizer, conversations, stop_ids, max_new_tokens, batch_size, on_batch, tools)
    return [choices[0] for choices in answers]


def sample_batched(model, tokenizer, conversations: list[list[dict]], stop_ids: list[int], max_new_tokens: int,
                   batch_size: int, on_batch=None, tools: list[list[dict] | None] | None = None,
                   temperature: float = 0.0, samples: int = 1, seed: int = 0) -> list[list[Generation]]:
    """`samples` answers per conversation at `temperature` (0: greedy, one answer), in input order. Conversation i's
    choice j is drawn with seed `seed + i * samples + j`, so two models asked with the same seed see the same random
    numbers (their comparison is paired) and a rerun gives the same answers. `on_batch(1)` follows each prompt."""
    from tokenizers import Tokenizer

    samples = samples if temperature else 1
    tools = tools or [None] * len(conversations)
    prompts = [generation_prompt_ids(tokenizer, messages, offered) for messages, offered in zip(conversations, tools)]
    route = Route(ModelGroup(model), None, frozenset(stop_ids),
                  Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    engine = BatchingEngine({"model": route}, max_batch=max(batch_size, samples), max_waiting=len(prompts) + 1,
                            prefill_chunk=PREFILL_CHUNK)
    texts = [[[] for _ in range(samples)] for _ in prompts]
    results: list[list[Generation | None]] = [[None] * samples for _ in prompts]

    def listener(index: int):
        def emit(update: ChoiceUpdate) -> None:
            texts[index][update.index].append(update.text)
            if update.finish_reason:
                results[index][update.index] = Generation("".join(texts[index][update.index]).strip(),
                                                          update.completion_tokens, update.finish_reason == "stop")
                if on_batch and all(results[index]):
                    on_batch(1)
        return emit

    try:
        # Similar lengths side by side waste less padding.
        for index in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                    seed=seed + index * samples if temperature else None)
            engine.submit(GenerationRequest("model", prompts[index], params, n=samples), listener(index))
        engine.run_until_done()
    finally:
        route.group.unpack()
    return results
