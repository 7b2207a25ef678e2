"""Prompts prefilled inside the running rows' decode pass answer exactly as with separate prefill passes, for a
base alone and for adapters mixed in one batch; a model whose fused pass does not match keeps separate passes."""

from __future__ import annotations

import pytest
import torch

from tunesmith.generation import fused_step
from tunesmith.generation.engine import BatchingEngine
from tunesmith.generation.model_group import ModelGroup
from tunesmith.generation.requests import ChoiceUpdate, GenerationRequest, SamplingParams
from tunesmith.models import load_model
from tunesmith.serve.engine import ServingEngine

SHARED = list(range(20, 38))  # 18 tokens: a later prompt starting with them reuses their cached keys
PROMPTS = [[5, 9, 13, 17, 21, 25, 29, 33], [6, 10], [7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51], SHARED + [8, 12],
           [5, 9, 13, 17, 21, 40, 41], SHARED + [44, 45, 46], [50, 51, 52], [60, 61, 62, 63, 64, 65, 66]]
LIMITS = [9, 4, 14, 6, 11, 8, 1, 7]
SAMPLED = 7
"""This prompt asks for two sampled choices (seeded): they join from one prefill, as rows sharing its cache."""


def answers(batching: BatchingEngine, models: list[str]) -> tuple[list[list[int]], int]:
    """Greedy token texts of every prompt (submitted two by two while earlier ones decode) and how many passes
    were fused."""
    fused_passes = 0
    original = ModelGroup.forward_fused

    def counted(group, *args, **kwargs):
        nonlocal fused_passes
        fused_passes += 1
        return original(group, *args, **kwargs)

    events = [[] for _ in PROMPTS]
    ModelGroup.forward_fused = counted
    try:
        for index, (ids, limit) in enumerate(zip(PROMPTS, LIMITS)):
            sampled = index == SAMPLED
            params = SamplingParams(max_tokens=limit, temperature=1.0 if sampled else 0.0, seed=3 if sampled else None)
            batching.submit(GenerationRequest(models[index % len(models)], ids, params, n=2 if sampled else 1),
                            events[index].append)
            if index % 2:
                for _ in range(3):
                    batching.step()
        batching.run_until_done()
    finally:
        ModelGroup.forward_fused = original
    texts = [["".join(e.text for e in got if isinstance(e, ChoiceUpdate) and e.index == choice) for choice in (0, 1)]
             for got in events]
    assert all(sum(1 for e in got if isinstance(e, ChoiceUpdate) and e.finish_reason) == (2 if i == SAMPLED else 1)
               for i, got in enumerate(events))
    return texts, fused_passes


@pytest.mark.parametrize("prefill_chunk", [4, 256])
def test_a_base_answers_the_same_with_prompts_prefilled_in_its_decode_passes(tiny_model_dir, prefill_chunk):
    """Prompts join while others decode, whole or in 4-token chunks over several fused passes."""
    from tokenizers import Tokenizer

    from tunesmith.generation.engine import Route
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    group = ModelGroup(load_model(tiny_model_dir))
    assert group.fuses
    route = Route(group, None, frozenset({tokenizer.eos_token_id}),
                  Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    batching = BatchingEngine({"tiny": route}, max_batch=4, prefill_chunk=prefill_chunk)
    fused, fused_passes = answers(batching, ["tiny"])
    assert batching.prefixes.reused_tokens >= len(SHARED)  # a prompt after its cached start, in a fused pass
    group.fuses = False
    separate, none = answers(BatchingEngine({"tiny": route}, max_batch=4, prefill_chunk=prefill_chunk), ["tiny"])
    assert fused_passes >= 3 and none == 0
    assert fused == separate


def test_adapters_mixed_in_a_batch_answer_the_same_with_fused_prefill(two_versions):
    engine = ServingEngine.from_references([str(run) for run in two_versions], default_max_tokens=8)
    group = engine.models["alpha"].route.group
    assert group.fuses and engine.models["beta"].route.group is group
    models = ["alpha", "beta", "tiny"] if "tiny" in engine.models else ["alpha", "beta"]
    routes = {name: engine.models[name].route for name in models}
    fused, fused_passes = answers(BatchingEngine(routes, max_batch=4, prefill_chunk=256), models)
    group.fuses = False
    separate, _ = answers(BatchingEngine(routes, max_batch=4, prefill_chunk=256), models)
    assert fused_passes >= 3
    assert fused == separate
    assert len({choices[0] for choices in fused}) > 1


def test_a_model_whose_fused_pass_differs_keeps_separate_passes(tiny_model_dir, monkeypatch):
    """Calibration: attention that ignores the cached keys (as a model whose attention bypasses transformers'
    interface would) gives other logits, so the model is left on plain SDPA."""
    def ignores_the_cache(step, module, query, key, value, scaling):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(1, 2), None

    monkeypatch.setattr(fused_step.FusedStep, "attend", ignores_the_cache)
    model = load_model(tiny_model_dir)
    assert not fused_step.enable_fused_steps(model)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    assert fused_step.enable_fused_steps(model)
    assert model.config._attn_implementation == fused_step.ATTENTION
    fused_step.disable_fused_steps(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_failed_fused_pass_fails_its_rows_and_prompts_and_the_engine_goes_on(tiny_model_dir, monkeypatch):
    from tokenizers import Tokenizer

    from tunesmith.generation.engine import Route
    from tunesmith.generation.requests import Failed
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    group = ModelGroup(load_model(tiny_model_dir))
    route = Route(group, None, frozenset(), Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    batching = BatchingEngine({"tiny": route}, max_batch=4)
    events = [[] for _ in range(3)]
    batching.submit(GenerationRequest("tiny", PROMPTS[0], SamplingParams(max_tokens=20)), events[0].append)
    batching.step()  # the first prompt decodes
    monkeypatch.setattr(ModelGroup, "forward_fused", lambda *args, **kwargs: 1 / 0)
    batching.submit(GenerationRequest("tiny", PROMPTS[1], SamplingParams(max_tokens=20)), events[1].append)
    batching.step()  # its decode pass would have prefilled the second
    monkeypatch.undo()
    batching.submit(GenerationRequest("tiny", PROMPTS[2], SamplingParams(max_tokens=5)), events[2].append)
    batching.run_until_done()
    assert [type(got[-1]) for got in events] == [Failed, Failed, ChoiceUpdate]
    assert events[0][-1].reason == events[1][-1].reason == "error"
    assert events[2][-1].finish_reason == "length" and not batching.has_work() and not group.rows


@pytest.mark.parametrize("setting, value", [("sliding_window", 8), ("rope_parameters", {"rope_type": "dynamic",
                                                                                         "factor": 2.0})])
def test_sliding_windows_and_length_dependent_rotary_keep_separate_passes(tiny_model_dir, setting, value):
    model = load_model(tiny_model_dir)
    setattr(model.config, setting, value)
    assert not fused_step.enable_fused_steps(model)
    assert model.config._attn_implementation == "sdpa"
