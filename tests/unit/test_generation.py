"""The batching engine on a tiny model: rows joining and leaving mid-flight answer exactly as they do alone."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tunesmith.data.template import end_of_turn_token_ids, generation_prompt_ids
from tunesmith.errors import TunesmithError
from tunesmith.generation.engine import BatchingEngine, EngineBusy, Route
from tunesmith.generation.model_group import ModelGroup
from tunesmith.generation.requests import ChoiceUpdate, Failed, GenerationRequest, SamplingParams
from tunesmith.generation.text_stream import TextStream
from tunesmith.models import load_model, load_tokenizer

QUESTIONS = ["Send 3 blue mug to Denver", "hi", "Ship twelve large red hats and one small green scarf to Oslo today",
             "What is 2+2?", "Order 5 pens", "Cancel order 77, it was a mistake, and refund the card ending 1234"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    return load_model(tiny_model_dir), tokenizer


def make_engine(model, tokenizer, **settings) -> BatchingEngine:
    from tokenizers import Tokenizer

    route = Route(ModelGroup(model), None, frozenset(end_of_turn_token_ids(tokenizer)),
                  Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    return BatchingEngine({"tiny": route}, **settings)


SYSTEM = "You extract the order from the customer's message and reply with JSON only: item, quantity, city."


def prompt(tokenizer, text: str) -> list[int]:
    return generation_prompt_ids(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}])


def run(engine: BatchingEngine, requests: list[GenerationRequest]) -> list[list]:
    events = [[] for _ in requests]
    for index, request in enumerate(requests):
        engine.submit(request, events[index].append)
    engine.run_until_done()
    return events


def text_of(events, choice: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, ChoiceUpdate) and e.index == choice)


def greedy_alone(model, tokenizer, ids: list[int], max_tokens: int) -> str:
    stops = end_of_turn_token_ids(tokenizer)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    end = next((k for k, token in enumerate(out) if token in stops), len(out))
    return tokenizer.decode(out[:end], skip_special_tokens=True)


@pytest.mark.parametrize("prefill_chunk, max_batch", [(5, 3), (4096, 4)])
def test_rows_joining_and_leaving_mid_flight_answer_as_they_do_alone(tiny, prefill_chunk, max_batch):
    """Six prompts of different lengths and limits through a few slots, prefilled in 5-token chunks or several
    prompts in one padded pass (after a reused prefix): rows join a running batch (padding either side), leave it
    early, and every answer matches plain one-at-a-time greedy."""
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk)
    limits = [12, 3, 20, 7, 1, 16]
    requests = [GenerationRequest("tiny", prompt(tokenizer, q), SamplingParams(max_tokens=m))
                for q, m in zip(QUESTIONS, limits)]
    events = run(engine, requests)
    for request, got in zip(requests, events):
        last = got[-1]
        assert isinstance(last, ChoiceUpdate) and last.finish_reason in {"stop", "length"}
        assert last.completion_tokens <= request.params.max_tokens
        assert last.prompt_tokens == len(request.prompt_ids)
        assert text_of(got) == greedy_alone(model, tokenizer, request.prompt_ids, request.params.max_tokens)
    assert engine.running == 0 and not engine.has_work()
    assert engine.prefixes.reused_tokens > 0  # the template's shared start was computed once, then reused


def test_choices_share_one_prefill_and_seeds_repeat(tiny):
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer)
    request = GenerationRequest("tiny", prompt(tokenizer, "hi"), SamplingParams(max_tokens=8, temperature=1.5, seed=7), n=3)
    first, again = run(engine, [request, request])
    texts = [text_of(first, i) for i in range(3)]
    assert texts == [text_of(again, i) for i in range(3)]  # same seed, same answers
    assert len(set(texts)) > 1  # each choice samples on its own
    assert sum(1 for e in first if e.finish_reason) == 3


def test_logprobs_rank_the_alternatives_and_greedy_picks_the_top(tiny):
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer)
    (events,) = run(engine, [GenerationRequest("tiny", prompt(tokenizer, "hi"), SamplingParams(max_tokens=5, logprobs=3))])
    entries = [entry for e in events for entry in e.logprobs]
    assert entries
    for entry in entries:
        values = [value for _, value, _ in entry.top]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0], abs=1e-5) and entry.logprob <= 0


def test_a_cancelled_request_frees_its_row_at_the_next_step(tiny):
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_batch=2)
    events = []
    handle = engine.submit(GenerationRequest("tiny", prompt(tokenizer, "hi"), SamplingParams(max_tokens=500)), events.append)
    engine.step()
    engine.step()
    assert engine.running == 1
    handle.cancel()
    engine.step()
    assert engine.running == 0 and not engine.has_work()
    assert not any(isinstance(e, ChoiceUpdate) and e.finish_reason for e in events)


def test_a_full_queue_is_refused_with_a_retry_hint_and_overdue_requests_fail(tiny):
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_batch=1, max_waiting=2)
    ids = prompt(tokenizer, "hi")
    for _ in range(2):
        engine.submit(GenerationRequest("tiny", ids, SamplingParams(max_tokens=2)), lambda e: None)
    with pytest.raises(EngineBusy) as busy:
        engine.submit(GenerationRequest("tiny", ids, SamplingParams(max_tokens=2)), lambda e: None)
    assert busy.value.retry_after >= 1
    engine.run_until_done()
    overdue = GenerationRequest("tiny", ids, SamplingParams(max_tokens=50), deadline=time.monotonic() - 1)
    (events,) = run(engine, [overdue])
    assert isinstance(events[-1], Failed) and events[-1].reason == "deadline"


def test_a_json_schema_constraint_always_yields_a_matching_answer(tiny):
    """A tiny random model cannot write JSON on its own; under the grammar every finished answer parses and
    matches the schema."""
    import jsonschema

    from tunesmith.generation.constraints import GrammarCompiler

    model, tokenizer = tiny
    schema = {"type": "object", "properties": {"item": {"enum": ["mug", "hat"]}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["item", "quantity"], "additionalProperties": False}
    compiler = GrammarCompiler(tokenizer, model.get_output_embeddings().weight.shape[0])
    engine = make_engine(model, tokenizer)
    requests = [GenerationRequest("tiny", prompt(tokenizer, q), SamplingParams(max_tokens=40, temperature=1.0, seed=s),
                                  constraint=compiler.json_schema(schema)) for s, q in enumerate(QUESTIONS)]
    for events in run(engine, requests):
        assert events[-1].finish_reason == "stop", text_of(events)
        jsonschema.validate(json.loads(text_of(events)), schema)
    with pytest.raises(TunesmithError, match="cannot be enforced"):
        compiler.json_schema({"type": "object", "properties": {"a": {"$ref": "#/missing"}}})


def test_text_is_released_only_when_no_stop_string_can_still_begin():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps({
        "version": "1.0", "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate("abcdEND ")},
                                    "unk_token": "a"},
        "pre_tokenizer": None, "decoder": {"type": "Fuse"}, "added_tokens": [], "normalizer": None, "post_processor": None,
        "truncation": None, "padding": None}))
    stream = TextStream(tokenizer, stops=("cd",))
    pieces = []
    for char in "abc":
        assert not stream.push("abcdEND ".index(char))
        pieces.append(stream.take_ready())
    assert pieces == ["a", "b", ""]  # "c" may begin "cd": held back
    assert stream.push("abcdEND ".index("d"))  # the stop string: cut before it
    assert stream.take_rest() == ""
    assert stream.text == "ab"


def test_prompts_with_and_without_a_cached_prefix_prefill_together(tiny):
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_batch=8, prefill_chunk=4096)
    run(engine, [GenerationRequest("tiny", prompt(tokenizer, "warm the cache"), SamplingParams(max_tokens=2))])
    other = generation_prompt_ids(tokenizer, [{"role": "user", "content": "No system prompt here, just a question"}])
    requests = [GenerationRequest("tiny", ids, SamplingParams(max_tokens=9))
                for ids in (prompt(tokenizer, "Order 5 pens"), other, prompt(tokenizer, "hi"))]
    reused = engine.prefixes.reused_tokens
    events = run(engine, requests)
    assert engine.prefixes.reused_tokens > reused
    for request, got in zip(requests, events):
        assert text_of(got) == greedy_alone(model, tokenizer, request.prompt_ids, 9)


def test_a_tiny_temperature_samples_the_most_likely_token_instead_of_failing():
    from tunesmith.generation.sampling import choose_tokens

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    generators = [torch.Generator().manual_seed(row) for row in range(3)]
    chosen = choose_tokens(logits, [3e-178, 1e-300, 1e-30], [1.0, 0.9, 0.5], generators)
    assert chosen == logits.argmax(dim=-1).tolist()
