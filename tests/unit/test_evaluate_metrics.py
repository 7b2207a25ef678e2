"""Per-example task metrics, user-defined metrics, JSON schema, label sets, and paired statistics."""

from __future__ import annotations

import json

import pytest

from tunesmith.config import EvaluateConfig
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.compare import largest_differences, mean_interval, paired_comparison
from tunesmith.evaluate.generate import Generation
from tunesmith.evaluate.metrics import corpus_scores, example_scores, rouge_l, score_examples, token_f1


def answer(text: str, stopped: bool = True) -> Generation:
    return Generation(text=text, new_tokens=len(text.split()) + stopped, stopped=stopped)


def test_token_f1_and_rouge_l_give_partial_credit():
    assert token_f1("The cat sat.", "a cat sat") == 1.0  # articles and punctuation are ignored
    assert token_f1("cat sat on mat", "cat sat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("dog", "cat") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert 0 < rouge_l("the cat on the mat", "the cat sat on the mat") < 1


def test_raw_exact_match_is_stricter_than_normalized():
    scores = example_scores(answer("Paris "), "paris", EvaluateConfig())
    assert scores["exact_match"] == 1.0 and scores["exact_match_raw"] == 0.0


def test_json_fields_and_schema_conformance(tmp_path):
    schema = tmp_path / "order.schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["item", "quantity"],
                                  "properties": {"quantity": {"type": "integer"}}}))
    settings = EvaluateConfig(json_output=True, json_schema=schema)
    reference = '{"item": "mug", "quantity": 3}'
    right_item = example_scores(answer('{"item": "mug", "quantity": "3"}'), reference, settings)
    assert right_item["field:item"] == 1.0 and right_item["field:quantity"] == 0.0
    assert right_item["json_valid"] == 1.0 and right_item["json_schema"] == 0.0  # quantity must be an integer
    perfect = example_scores(answer('{"quantity": 3, "item": "mug"}'), reference, settings)
    assert perfect["json_schema"] == perfect["field:quantity"] == perfect["exact_match"] == 1.0
    broken = example_scores(answer("item: mug"), reference, settings)
    assert broken["json_valid"] == broken["json_schema"] == broken["field:item"] == 0.0


def test_bad_schema_file_is_one_clear_error(tmp_path):
    from tunesmith.data.answers import load_json_schema

    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object",\n "properties": }')
    with pytest.raises(TunesmithError, match=r"bad.json:2: not valid JSON"):
        load_json_schema(str(bad))
    bad.write_text('{"type": 12}')
    with pytest.raises(TunesmithError, match="not a valid JSON schema"):
        load_json_schema(str(bad))


def test_classification_accuracy_and_macro_f1_over_the_label_set():
    settings = EvaluateConfig(labels=["positive", "negative", "neutral"])
    references = ["positive", "positive", "negative", "neutral"]
    outputs = [answer("Positive."), answer("negative"), answer("negative"), answer("I think it is fine")]
    per_example = score_examples(outputs, references, settings)
    assert per_example["accuracy"] == [1.0, 0.0, 1.0, 0.0]
    # positive: P=1 R=.5 F1=.667; negative: P=.5 R=1 F1=.667; neutral: F1=0 -> macro 0.444
    assert corpus_scores(outputs, references, settings)["macro_f1"] == pytest.approx(4 / 9, abs=1e-6)


def test_regex_must_match_the_whole_answer():
    settings = EvaluateConfig(regex=r"\d{3}-\d{4}")
    assert example_scores(answer("555-1234"), "x", settings)["regex_match"] == 1.0
    assert example_scores(answer("call 555-1234"), "x", settings)["regex_match"] == 0.0


def test_custom_metric_from_a_file(tmp_path):
    module = tmp_path / "my_metrics.py"
    module.write_text("def starts_right(prediction, reference):\n    return prediction[:1] == reference[:1]\n\n"
                      "def broken(prediction, reference):\n    return 'high'\n")
    settings = EvaluateConfig(custom_metrics=[f"{module}:starts_right"])
    assert score_examples([answer("Paris"), answer("Rome")], ["Pa", "Pa"], settings)["starts_right"] == [1.0, 0.0]
    with pytest.raises(TunesmithError, match="must return a finite number"):
        score_examples([answer("x")], ["y"], EvaluateConfig(custom_metrics=[f"{module}:broken"]))
    with pytest.raises(TunesmithError, match="has no function 'missing'"):
        score_examples([answer("x")], ["y"], EvaluateConfig(custom_metrics=[f"{module}:missing"]))
    with pytest.raises(TunesmithError, match="not a function reference"):
        score_examples([answer("x")], ["y"], EvaluateConfig(custom_metrics=["no_colon_here"]))


def test_custom_metric_paths_resolve_against_the_yaml_folder(tmp_path):
    import yaml

    from tunesmith.config import load_config

    (tmp_path / "m.py").write_text("def one(p, r):\n    return 1\n")
    (tmp_path / "s.json").write_text("{}")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"train": "t.jsonl"}, "evaluate": {
        "custom_metrics": ["m.py:one", "json:dumps"], "json_schema": "s.json"}}))
    settings = load_config(tmp_path / "c.yaml").evaluate
    assert settings.custom_metrics == [f"{tmp_path.resolve()}/m.py:one", "json:dumps"]
    assert settings.json_schema == (tmp_path / "s.json").resolve()


def test_paired_comparison_finds_a_real_improvement_and_not_a_fake_one():
    base = [0.0] * 30 + [1.0] * 10
    better = [1.0] * 30 + [1.0] * 10  # wins 30 examples, loses none
    result = paired_comparison(base, better, confidence=0.95, resamples=2000)
    assert result["delta"] == pytest.approx(0.75) and result["wins"] == 30 and result["losses"] == 0
    assert 0.5 < result["delta_low"] <= 0.75 <= result["delta_high"] < 1.0
    assert result["p_value"] < 0.001 and result["significant"]
    shuffled = [1.0, 0.0] * 20  # same mean as a coin flip against an alternating base: no evidence
    noise = paired_comparison([0.0, 1.0] * 20, shuffled, confidence=0.95, resamples=2000)
    assert noise["delta"] == 0 and noise["wins"] == noise["losses"] == 20
    assert noise["p_value"] > 0.5 and not noise["significant"] and noise["delta_low"] < 0 < noise["delta_high"]


def test_mean_interval_brackets_the_mean_and_collapses_on_constant_data():
    low, high = mean_interval([0.0, 1.0] * 50, 0.95, 2000)
    assert 0.38 < low < 0.5 < high < 0.62
    assert mean_interval([1.0] * 10, 0.95, 2000) == (1.0, 1.0)


def test_largest_differences_lists_gains_then_losses():
    base = {"exact_match": [0, 1, 0, 1], "token_f1": [0.2, 1.0, 0.5, 1.0]}
    candidate = {"exact_match": [1, 0, 0, 1], "token_f1": [1.0, 0.1, 0.9, 1.0]}
    assert largest_differences(base, candidate, 2) == {"gained": [0, 2], "lost": [1]}
