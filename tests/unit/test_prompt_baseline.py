"""The prompting baseline's building blocks: few-shot selection, conversations, token accounting and its cost."""

from __future__ import annotations

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.evaluate.prompt_baseline import (
    check_fits_context,
    cost_per_million_requests,
    extra_prompt_tokens,
    few_shot_conversations,
    few_shot_tokenized,
)
from tunesmith.types import ChatExample


def chat(user: str, answer: str, system: str | None = None) -> ChatExample:
    turns = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return ChatExample(messages=turns)


TRAIN = [chat("Send two red mugs to Denver", "mug"), chat("What is the capital of France", "Paris"),
         chat("Ship one blue lamp to Oslo", "lamp"), chat("Translate hello into German", "Hallo")]


def test_similar_selection_puts_the_closest_training_examples_before_the_request_after_the_system_prompt():
    request = chat("Ship three blue lamps to Oslo please", "lamp", system="Extract the item.")
    [conversation] = few_shot_conversations(TRAIN, [request], k=2, selection="similar", seed=0)
    assert conversation[0] == {"role": "system", "content": "Extract the item."}
    assert conversation[-1] == {"role": "user", "content": "Ship three blue lamps to Oslo please"}
    shots = conversation[1:-1]
    assert [m["role"] for m in shots] == ["user", "assistant"] * 2
    assert shots[-2:] == [{"role": "user", "content": "Ship one blue lamp to Oslo"},
                          {"role": "assistant", "content": "lamp"}]  # the most similar sits closest
    assert shots[0]["content"] == "Send two red mugs to Denver"


def test_random_selection_is_one_seeded_set_for_every_request_and_k_zero_is_the_plain_prompt():
    requests = [chat("Ship a hat to Lisbon", "hat"), chat("Capital of Spain", "Madrid")]
    first = few_shot_conversations(TRAIN, requests, k=3, selection="random", seed=7)
    again = few_shot_conversations(TRAIN, requests, k=3, selection="random", seed=7)
    assert first == again and first[0][:-1] == first[1][:-1] and len(first[0]) == 7
    assert few_shot_conversations(TRAIN, requests, k=0, selection="random", seed=7) == [
        [{"role": "user", "content": "Ship a hat to Lisbon"}], [{"role": "user", "content": "Capital of Spain"}]]
    assert len(few_shot_conversations(TRAIN, requests, k=50, selection="similar", seed=0)[0]) == 9  # all 4, no more
    rows = [{"messages": [{"role": "user", "content": "Ship a hat"}, {"role": "assistant", "content": "hat"}]}]
    assert few_shot_conversations(rows, rows, k=1, selection="similar", seed=0)[0][1]["content"] == "hat"
    with pytest.raises(TunesmithError, match="selection 'nearest' is not one of similar, random"):
        few_shot_conversations(TRAIN, requests, k=1, selection="nearest", seed=0)


def test_extra_tokens_are_counted_with_the_tokenizer_and_costed_per_million_requests(tiny_model_dir):
    from tunesmith.data.template import generation_prompt_ids
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    requests = [chat("Send 3 red mugs to Lisbon", "mug"), chat("Hello world", "hi")]
    plain = few_shot_conversations(TRAIN, requests, k=0, selection="similar", seed=0)
    few = few_shot_conversations(TRAIN, requests, k=2, selection="similar", seed=0)
    extra = extra_prompt_tokens(tokenizer, plain, few)
    expected = [len(generation_prompt_ids(tokenizer, f)) - len(generation_prompt_ids(tokenizer, p))
                for p, f in zip(plain, few)]
    assert extra == sum(expected) / 2 and extra > 10
    assert cost_per_million_requests(extra, 0.5) == pytest.approx(extra * 0.5)
    assert cost_per_million_requests(200, 0.15) == pytest.approx(30.0)  # 200M tokens at 0.15 per 1M

    tokenized = few_shot_tokenized(tokenizer, few, ["mug", "hi"], [None, None])
    answer_ids = tokenizer("mug", add_special_tokens=False)["input_ids"]
    trained = [i for i, label in zip(tokenized[0].input_ids, tokenized[0].labels) if label != -100]
    assert trained[: len(answer_ids)] == answer_ids  # only the request's own answer: the shots' answers are context
    assert len(tokenized[0].input_ids) > len(generation_prompt_ids(tokenizer, few[0]))  # nothing was cut

    check_fits_context(tokenizer, few, max_new_tokens=8, context_length=512, k=2)
    with pytest.raises(TunesmithError, match="evaluate.prompt_baseline=2: held-out example 1's few-shot prompt is"):
        check_fits_context(tokenizer, few, max_new_tokens=8, context_length=20, k=2)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """A tiny run trained for 4 steps on 40 order rows."""
    from conftest import make_trained_run

    return make_trained_run(tmp_path_factory.mktemp("prompting"), tiny_model_dir, "orders", seed=0, steps=4)


def test_the_prompt_baseline_is_a_contender_with_its_gain_and_the_tokens_fine_tuning_saves(trained_run, monkeypatch):
    import tunesmith.evaluate.run as stage
    from tunesmith.config import load_run_config
    from tunesmith.data.prepare import read_split
    from tunesmith.models import load_tokenizer

    asked = []
    real_generate = stage.sample_batched

    def recording(model, tokenizer, conversations, *args, **kwargs):
        asked.append(conversations)
        return real_generate(model, tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(stage, "sample_batched", recording)
    config = load_run_config(trained_run, ["evaluate.prompt_baseline=2", "evaluate.prompt_token_price=2.0",
                                           "evaluate.max_new_tokens=4", "evaluate.bootstrap_samples=300"])
    report = stage.evaluate_run(trained_run, config, gates=["exact_match >= base - 1"])

    assert list(report["results"]) == ["base", "prompt-baseline", "fine-tuned"]
    assert [len(conversations[0]) for conversations in asked] == [1, 5, 1]  # the request; 2 shots before it
    results = report["results"]
    assert results["prompt-baseline"]["validation_loss"] != results["base"]["validation_loss"]  # shots as context
    assert "exact_match" in report["intervals"]["prompt-baseline"]
    prompting = report["against_prompting"]
    examples = stage.evaluation_examples(stage.Run.open(trained_run))
    plain = few_shot_conversations([], examples, k=0, selection="similar", seed=0)
    few = few_shot_conversations(read_split(trained_run, "train"), examples, k=2, selection="similar", seed=config.seed)
    extra = extra_prompt_tokens(load_tokenizer(trained_run / "adapter"), plain, few)
    assert prompting["extra_prompt_tokens"] == pytest.approx(extra, abs=0.01) and extra > 20
    assert prompting["cost_per_million_requests"] == pytest.approx(extra * 2.0, abs=0.05)
    gain = prompting["metrics"]["exact_match"]
    assert gain["delta"] == pytest.approx(results["fine-tuned"]["exact_match"] - results["prompt-baseline"]["exact_match"],
                                          abs=1e-3)
    assert [g["model"] for g in report["gates"]] == ["fine-tuned"]  # the baseline is context, not a candidate
    markdown = (trained_run / "eval" / "report.md").read_text()
    assert "## Against prompting" in markdown and "of exact_match over prompting with 2 similar examples" in markdown
    assert f"it saves {extra:.0f} prompt tokens per request" in markdown


def test_a_few_shot_prompt_longer_than_the_context_is_refused_not_cut(trained_run):
    from tunesmith.config import load_run_config
    from tunesmith.evaluate.run import evaluate_run

    config = load_run_config(trained_run, ["evaluate.prompt_baseline=3", "evaluate.max_new_tokens=480"])
    with pytest.raises(TunesmithError, match="exceeds the model's context of 512; lower evaluate.prompt_baseline"):
        evaluate_run(trained_run, config)
