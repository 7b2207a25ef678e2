"""Gates, the overfitting check on recorded loss curves, judge verdict handling, and the shipped general sets."""

from __future__ import annotations

import pytest
import yaml

from tunesmith.config import EvaluateConfig
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.gates import (
    check_gate_metrics,
    check_gates,
    describe_outcome,
    parse_gate,
    reported_metrics,
)
from tunesmith.evaluate.generate import Generation
from tunesmith.evaluate.metrics import corpus_scores, example_scores
from tunesmith.evaluate.general import general_questions, general_texts, mentions_answer
from tunesmith.evaluate.judge import combine, parse_verdict, summarize
from tunesmith.registry.overfitting import overfitting_check

RESULTS = {"base": {"exact_match": 0.40, "general_ppl": 10.0},
           "fine-tuned": {"exact_match": 0.55, "general_ppl": 10.4},
           "other": {"exact_match": 0.70, "general_ppl": 11.0}}


def test_relative_and_absolute_gates_say_which_model_failed_and_by_how_much():
    gates = [parse_gate("exact_match >= base + 0.20"), parse_gate("general_ppl <= base * 1.05"),
             parse_gate("exact_match > 0.5")]
    outcomes = {(o["gate"], o["model"]): o for o in check_gates(gates, RESULTS, {"base": "base"})}
    assert len(outcomes) == 6  # every gate against every model but the base
    failed = outcomes[("exact_match >= base + 0.20", "fine-tuned")]
    assert not failed["passed"] and failed["threshold"] == pytest.approx(0.60)
    assert failed["margin"] == pytest.approx(-0.05)
    assert "FAILED: fine-tuned exact_match = 0.55 vs threshold 0.6" in describe_outcome(failed)
    assert "margin -0.05" in describe_outcome(failed)
    assert outcomes[("exact_match >= base + 0.20", "other")]["passed"]
    assert outcomes[("general_ppl <= base * 1.05", "fine-tuned")]["passed"]
    assert not outcomes[("general_ppl <= base * 1.05", "other")]["passed"]  # 11.0 > 10.5
    assert outcomes[("exact_match > 0.5", "fine-tuned")]["passed"]


@pytest.mark.parametrize("text", ["exact_match >> base", "exact_match >= base + lots", "= 3", "exact_match"])
def test_malformed_gates_are_one_clear_error(text):
    with pytest.raises(TunesmithError, match="examples:"):
        parse_gate(text)


def test_gate_on_an_unknown_metric_names_the_known_ones():
    with pytest.raises(TunesmithError, match="no metric 'exact' .*known: exact_match, general_ppl"):
        check_gates([parse_gate("exact >= 0.5")], RESULTS, {"base": "base"})


def test_a_misspelled_gate_metric_is_refused_up_front_with_a_suggestion():
    with pytest.raises(TunesmithError, match=r"no metric 'exact_matc'; did you mean 'exact_match'\?.*reports: "):
        check_gate_metrics([parse_gate("exact_matc >= base")], EvaluateConfig())


def test_a_gate_on_a_metric_this_config_does_not_report_says_which_option_reports_it():
    with pytest.raises(TunesmithError, match="json_valid is not reported with this config; set evaluate.json_output"):
        check_gate_metrics([parse_gate("json_valid >= 0.9")], EvaluateConfig())
    with pytest.raises(TunesmithError, match="evaluate.general_check=true"):
        check_gate_metrics([parse_gate("general_ppl <= base * 1.05")], EvaluateConfig(general_check=False))
    with pytest.raises(TunesmithError, match="evaluate.harness.tasks"):
        check_gate_metrics([parse_gate("harness:arc_easy:acc >= 0.5")], EvaluateConfig())


def test_gates_on_every_metric_the_config_reports_pass_the_up_front_check(tmp_path):
    module = tmp_path / "my_metrics.py"
    module.write_text("def brevity(prediction, reference):\n    return float(len(prediction) <= len(reference))\n",
                      encoding="utf-8")
    settings = EvaluateConfig(json_output=True, labels=["yes", "no"], regex=".*", custom_metrics=[f"{module}:brevity"],
                              harness={"tasks": ["arc_easy"]})
    names = ["exact_match", "general_qa", "validation_loss", "json_valid", "field:qty", "accuracy", "macro_f1",
             "regex_match", "brevity", "harness:arc_easy:acc"]
    check_gate_metrics([parse_gate(f"{name} >= 0") for name in names], settings)


@pytest.mark.parametrize("settings", [EvaluateConfig(), EvaluateConfig(json_output=True, labels=["a", "b"], regex="x+")])
def test_the_up_front_metric_list_holds_every_metric_the_scorers_report(settings):
    generation = Generation(text='{"a": 1}', new_tokens=3, stopped=True)
    scored = {**example_scores(generation, '{"a": 1}', settings), **corpus_scores([generation], ['{"a": 1}'], settings)}
    names = {"mean_new_tokens" if name == "new_tokens" else name for name in scored if not name.startswith("field:")}
    assert names <= set(reported_metrics(settings))


def test_evaluate_refuses_a_misspelled_gate_before_opening_any_model(monkeypatch, tmp_path):
    from tunesmith.evaluate import run as evaluate_stage

    monkeypatch.setattr(evaluate_stage.Run, "open", classmethod(lambda cls, path: object()))  # nothing may be read
    monkeypatch.setattr(evaluate_stage, "load_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    config = load_config_with(tmp_path, {})
    with pytest.raises(TunesmithError, match="did you mean 'exact_match'"):
        evaluate_stage.evaluate_run(tmp_path, config, gates=["exact_matc >= base"])


@pytest.mark.parametrize("command", ["run", "prepare"])
def test_run_and_prepare_refuse_a_misspelled_config_gate_before_preparing(monkeypatch, tmp_path, command):
    from typer.testing import CliRunner

    from tunesmith.cli.main import app

    monkeypatch.setattr("tunesmith.data.prepare.prepare", lambda *a, **k: pytest.fail("data were prepared"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "data": {"train": "train.jsonl"},
                                      "registry": {"promote_if": ["exact_mtch >= champion + 0.02"]}}), encoding="utf-8")
    result = CliRunner().invoke(app, [command, str(config)])
    assert isinstance(result.exception, TunesmithError) and "did you mean 'exact_match'" in str(result.exception)


def load_config_with(tmp_path, raw: dict):
    from tunesmith.config import validate_config

    return validate_config({"name": "t", "data": {"train": str(tmp_path / "train.jsonl")}, **raw})


def test_relative_gate_without_a_base_is_refused():
    with pytest.raises(TunesmithError, match="compare_base"):
        check_gates([parse_gate("exact_match >= base")], {"fine-tuned": RESULTS["fine-tuned"]}, {})


def test_champion_gates_compare_with_the_champion_and_skip_it():
    gates = [parse_gate("exact_match >= champion + 0.02"), parse_gate("general_ppl <= champion * 1.05")]
    outcomes = check_gates(gates, RESULTS, {"base": "base", "champion": "fine-tuned"})
    assert {o["model"] for o in outcomes} == {"other"}  # neither reference is judged
    gain, ppl = outcomes
    assert gain["passed"] and gain["threshold"] == pytest.approx(0.57)
    assert not ppl["passed"] and ppl["threshold"] == pytest.approx(10.92)
    with pytest.raises(TunesmithError, match="champion model, which was not evaluated"):
        check_gates(gates, RESULTS, {"base": "base"})


def curve(*losses, every=10):
    return [{"step": every * (i + 1), "loss": loss} for i, loss in enumerate(losses)]


def test_overfitting_is_flagged_when_validation_rises_while_training_falls():
    train = {"loss_curve": curve(2.0, 1.0, 0.5, 0.2, 0.05), "validation_curve": curve(2.1, 1.2, 1.0, 1.3, 1.6)}
    verdict = overfitting_check(train, tolerance=0.10)
    assert verdict["overfitting"] and verdict["status"] == "diverging"
    assert verdict["best_step"] == 30 and verdict["relative_rise"] == pytest.approx(0.6)
    assert "rose 60%" in verdict["message"]


def test_healthy_curves_and_missing_validation_curve_are_not_flagged():
    healthy = overfitting_check({"loss_curve": curve(2.0, 1.0, 0.5), "validation_curve": curve(2.1, 1.2, 1.15)}, 0.10)
    assert healthy["status"] == "ok" and not healthy["overfitting"]
    small_rise = overfitting_check({"loss_curve": curve(2.0, 1.0, 0.5), "validation_curve": curve(2.1, 1.0, 1.05)}, 0.10)
    assert small_rise["status"] == "ok"
    missing = overfitting_check({"loss_curve": curve(2.0, 1.0)}, 0.10)
    assert missing["status"] == "unknown" and not missing["overfitting"] and missing["train_curve"]


def test_judge_verdicts_are_read_and_position_swaps_combined():
    assert [parse_verdict(t) for t in ["A", " b.", "Tie", "**B** is better", "Answer A", ""]] == \
        ["A", "B", "TIE", "B", None, None]
    # First call has the candidate as B, the second as A.
    assert combine("B", "A") == "win" and combine("A", "B") == "loss"
    assert combine("B", "B") == "tie"  # the judge preferred whichever came second: position bias
    assert combine("TIE", "TIE") == "tie" and combine(None, "A") == "invalid"
    summary = summarize(["win", "win", "loss", "tie", "invalid"], [True, True, True, False, False],
                        [1.0, 0.0, -1.0, 0.0, 0.0])
    assert summary["wins"] == 2 and summary["losses"] == 1 and summary["ties"] == 1 and summary["invalid"] == 1
    assert summary["win_rate"] == pytest.approx(2.5 / 4) and summary["position_agreement"] == pytest.approx(3 / 4)
    assert summary["metric_agreement"] == 1.0  # the one win and one loss where the metric moved agree with it


def test_shipped_general_sets_load_and_score_whole_words():
    assert len(general_texts()) >= 20 and all(len(t.split()) > 10 for t in general_texts())
    questions = general_questions()
    assert len(questions) >= 30 and all(q["answers"] for q in questions)
    assert mentions_answer("The capital is Paris.", ["Paris"])
    assert not mentions_answer("Parisian food", ["Paris"]) and not mentions_answer("14", ["4", "four"])
    assert not mentions_answer("12 divided by 4 is 2.5", ["2"]) and mentions_answer("It is 2.", ["2"])
