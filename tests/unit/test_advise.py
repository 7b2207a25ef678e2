"""`tunesmith advise`: the decision rule on constructed scores, and the command end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tunesmith.cli.advise_command import advise_command
from tunesmith.evaluate.advise import (FINE_TUNE, LONG_PROMPT, MIN_GAIN, MORE_DATA, PROMPT, SATURATED, CurvePoint,
                                       decide, learning_curve_fit, share_sizes)
from tunesmith.registry.run import Run


def curve(*scores: float, rows: int = 400) -> tuple[CurvePoint, ...]:
    sizes = share_sizes(rows)
    return tuple(CurvePoint(share, size, 30, score) for share, size, score in zip((0.25, 0.5, 1.0), sizes, scores))


def advise_app() -> typer.Typer:
    """The command as the lead registers it in cli/main.py."""
    commands = typer.Typer()
    commands.command("advise")(advise_command)
    commands.command("unused")(lambda: None)  # two commands, so `advise` stays a named subcommand
    return commands


def test_prompting_that_matches_fine_tuning_says_do_not_fine_tune():
    advice = decide("accuracy", zero_shot=0.1, few_shot=0.95, shots=4, curve=curve(0.9, 0.95, 1.0),
                    extra_prompt_tokens=60, cost_per_million=9.0)
    assert advice.verdict == PROMPT
    assert advice.reason.startswith("don't fine-tune") and "prompting with 4 examples scores 95%" in advice.reason
    assert "fine-tuning reached 100%" in advice.reason


def test_prompting_that_fine_tuning_cannot_beat_but_that_scores_low_says_so():
    advice = decide("exact_match", zero_shot=0.0, few_shot=0.1, shots=4, curve=curve(0.1, 0.1, 0.15))
    assert advice.verdict == PROMPT and "neither reaches 50%" in advice.reason
    assert "neither" not in decide("exact_match", 0.0, 0.9, 4, curve(0.9, 0.9, 0.9)).reason


def test_a_clear_gain_on_a_flat_curve_says_fine_tune_with_the_tokens_it_saves():
    advice = decide("exact_match", zero_shot=0.0, few_shot=0.4, shots=4, curve=curve(0.97, 0.98, 1.0),
                    extra_prompt_tokens=312.4, cost_per_million=46.86)
    assert advice.verdict == FINE_TUNE
    assert "+60 points over prompting" in advice.reason
    assert "saves 312 prompt tokens per request (46.86 per 1M requests)" in advice.reason


def test_matching_long_few_shot_prompts_says_fine_tune_for_the_tokens_and_short_ones_say_prompt():
    long_prompt = decide("exact_match", 0.0, 0.9, 4, curve(0.9, 0.9, 0.9), extra_prompt_tokens=LONG_PROMPT + 100)
    assert long_prompt.verdict == FINE_TUNE
    assert f"saves {LONG_PROMPT + 100} prompt tokens per request" in long_prompt.reason
    short_prompt = decide("exact_match", 0.0, 0.9, 4, curve(0.9, 0.9, 0.9), extra_prompt_tokens=LONG_PROMPT - 100)
    assert short_prompt.verdict == PROMPT


def test_a_gain_of_exactly_the_margin_counts_despite_float_rounding():
    assert 1.0 - 0.9 < MIN_GAIN  # why the rule rounds
    assert decide("exact_match", 0.0, 0.9, 4, curve(1.0, 1.0, 1.0)).verdict == FINE_TUNE


def test_a_steeply_rising_curve_below_saturation_says_gather_more_data():
    advice = decide("exact_match", zero_shot=0.0, few_shot=0.2, shots=4, curve=curve(0.2, 0.45, 0.7))
    assert advice.verdict == MORE_DATA
    assert advice.gain_per_doubling == pytest.approx(0.25)
    assert advice.projected_at_double == pytest.approx(0.95)
    assert "+25 points per doubling" in advice.reason


def test_a_rising_curve_that_is_already_saturated_is_fine_tune_not_more_data():
    advice = decide("exact_match", zero_shot=0.0, few_shot=0.2, shots=4, curve=curve(0.5, 0.8, SATURATED))
    assert advice.gain_per_doubling > 0.2
    assert advice.verdict == FINE_TUNE


def test_few_shot_counts_only_when_it_beats_zero_shot_by_the_margin():
    close = decide("accuracy", zero_shot=0.9, few_shot=0.9 + MIN_GAIN / 2, shots=4, curve=curve(0.9, 0.9, 0.9))
    assert not close.few_shot_wins and close.prompting == 0.9 and "prompting zero-shot" in close.reason
    far = decide("accuracy", zero_shot=0.5, few_shot=0.9, shots=4, curve=curve(0.9, 0.9, 0.9))
    assert far.few_shot_wins and far.prompting == 0.9 and far.verdict == PROMPT


def test_the_curve_fit_is_score_against_log2_examples():
    slope, projected = learning_curve_fit(curve(0.3, 0.4, 0.5, rows=400))
    assert slope == pytest.approx(0.1)
    assert projected == pytest.approx(0.6)
    assert learning_curve_fit(curve(0.2, 0.9, 1.0))[1] <= 1.0


def test_share_sizes_round_up_and_never_reach_zero():
    assert share_sizes(10) == [3, 5, 10]
    assert share_sizes(1) == [1, 1, 1]


@pytest.fixture
def advise_config(tmp_path, tiny_config) -> str:
    raw = yaml.safe_load(tiny_config.read_text(encoding="utf-8"))
    raw["train"]["learning_rate"] = 0.01
    raw["evaluate"]["general_check"] = False
    tiny_config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(tiny_config)


def test_advise_runs_end_to_end_prints_a_verdict_and_writes_the_advice(advise_config, tmp_path):
    result = CliRunner().invoke(advise_app(), ["advise", advise_config, "--examples", "5", "--shots", "2",
                                               "--steps", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "fine-tune or prompt?" in result.output
    assert "LoRA on 25% of the data" in result.output and "learning curve" in result.output
    advice = json.loads((tmp_path / "runs" / "tiny-advise" / "advice.json").read_text(encoding="utf-8"))
    assert advice["verdict"] in (PROMPT, FINE_TUNE, MORE_DATA)
    assert advice["metric"] == "exact_match" and advice["shots"] == 2 and advice["held_out_examples"] == 5
    assert [point["steps"] for point in advice["curve"]] == [2, 2, 2]
    train_rows = Run.open(tmp_path / "runs" / "tiny-advise").manifest.data.rows["train"]
    assert [point["examples"] for point in advice["curve"]] == share_sizes(train_rows)
    assert advice["extra_prompt_tokens"] > 0
    for share in ("share-25", "share-50", "share-100"):
        assert (tmp_path / "runs" / "tiny-advise" / share / "adapter" / "adapter_config.json").is_file()
        assert Run.open(tmp_path / "runs" / "tiny-advise" / share).manifest.data.replay is None  # probes skip replay
    assert advice["reason"].split(":")[0] in result.output.replace("\n", " ")


def test_advise_json_prints_only_json_on_stdout(advise_config, tmp_path, monkeypatch):
    def measured(settings, examples, shots, steps):
        print("progress that must not reach stdout")
        return decide("exact_match", 0.0, 0.5, shots, curve(0.9, 0.95, 1.0)), tmp_path / "runs" / "tiny-advise"

    monkeypatch.setattr("tunesmith.cli.advise_command.run_advise", measured)
    result = CliRunner().invoke(advise_app(), ["advise", advise_config, "--shots", "3", "--json"])
    assert result.exit_code == 0, result.output
    advice = json.loads(result.stdout)
    assert advice["verdict"] == FINE_TUNE and advice["shots"] == 3 and advice["run_dir"].endswith("tiny-advise")
    # Without --shots: evaluate.prompt_baseline when the config sets it, else four.
    for overrides, shots in (([], 4), (["evaluate.prompt_baseline=2"], 2)):
        result = CliRunner().invoke(advise_app(), ["advise", advise_config, *overrides, "--json"])
        assert json.loads(result.stdout)["shots"] == shots


def test_advise_refuses_a_preference_config_in_one_line(advise_config):
    result = CliRunner().invoke(advise_app(), ["advise", advise_config, "train.method=dpo"])
    assert result.exit_code == 2
    assert "advise weighs SFT against prompting" in result.output and "Traceback" not in result.output
