"""Preference pairs mined from a run's own sampled mistakes, and evaluation of sampled answers."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tunesmith.cli.main import app
from tunesmith.config import load_run_config
from tunesmith.data.formats import read_examples
from tunesmith.data.prepare import read_split
from tunesmith.evaluate.metrics import is_exact_match, score_samples
from tunesmith.evaluate.run import evaluate_run
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.generate import Generation
from tunesmith.evaluate.mined_pairs import mine_pairs
from tunesmith.types import PreferenceExample



def test_pairs_hold_the_reference_and_a_wrong_answer_the_model_really_gave(two_versions, tmp_path):
    run_dir = two_versions[0]
    out, again = tmp_path / "pairs.jsonl", tmp_path / "again.jsonl"
    runner = CliRunner()
    first = runner.invoke(app, ["data", "mine-pairs", str(run_dir), "-o", str(out), "--samples", "3",
                                "--max-prompts", "12", "--seed", "5"])
    assert first.exit_code == 0, first.output
    assert "pairs" in first.output and "answers wrong" in first.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    train = {json.dumps(e.prompt_messages()): e.reference() for e in read_split(run_dir, "train")[:12]}
    assert 0 < len(rows) <= 12
    for row in rows:
        reference = train[json.dumps(row["prompt"])]
        assert row["chosen"] == [{"role": "assistant", "content": reference}]
        assert not is_exact_match(row["rejected"][0]["content"], reference, json_output=True)
    # The same seed samples the same answers, so the same pairs.
    assert runner.invoke(app, ["data", "mine-pairs", str(run_dir), "-o", str(again), "--samples", "3",
                               "--max-prompts", "12", "--seed", "5"]).exit_code == 0
    assert again.read_text() == out.read_text()
    # A reply cut after its mistake says so (training must not end the turn there); whole mistakes do not.
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, ["data", "mine-pairs", str(run_dir), "-o", str(whole), "--samples", "3",
                               "--max-prompts", "12", "--seed", "5", "--whole"]).exit_code == 0
    whole_rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert [r["prompt"] for r in whole_rows] == [r["prompt"] for r in rows]
    for cut, full in zip(rows, whole_rows):
        assert "rejected_cut" not in full
        assert cut.get("rejected_cut", False) == (cut["rejected"] != full["rejected"])

    # The file is preference data as `prepare` reads it.
    examples = read_examples(out)
    assert [type(e) for e in examples] == [PreferenceExample] * len(rows)
    assert examples[0].rejected == rows[0]["rejected"][0]["content"]
    assert [bool(e.rejected_cut) for e in examples] == [r.get("rejected_cut", False) for r in rows]

def test_mining_refuses_greedy_answers_and_untrained_runs(two_versions, tmp_path):
    runner = CliRunner()
    greedy = runner.invoke(app, ["data", "mine-pairs", str(two_versions[0]), "-o", str(tmp_path / "p.jsonl"),
                                 "--temperature", "0"])
    assert greedy.exit_code == 2 and "temperature" in greedy.output and "Traceback" not in greedy.output
    assert not (tmp_path / "p.jsonl").exists()
    missing = runner.invoke(app, ["data", "mine-pairs", str(tmp_path / "nowhere"), "-o", str(tmp_path / "p.jsonl")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_an_example_scores_the_share_of_its_samples_that_were_right():
    from tunesmith.config import EvaluateConfig

    right, wrong = Generation('{"a": 1}', 5, True), Generation("nope", 2, True)
    scores = score_samples([[right, wrong], [right, right]], ['{"a": 1}', '{"a": 1}'],
                           EvaluateConfig(json_output=True))
    assert scores["exact_match"] == [0.5, 1.0]
    assert scores["json_valid"] == [0.5, 1.0]


def test_sampled_evaluation_is_paired_and_repeatable(two_versions, tmp_path):
    run_dir = shutil.copytree(two_versions[1], tmp_path / "beta")  # the shared run's report stays as it was
    config = load_run_config(run_dir, ["evaluate.temperature=1.0", "evaluate.samples=2", "evaluate.max_examples=6"])
    first = evaluate_run(run_dir, config)
    assert first["generation"]["do_sample"] is True and first["generation"]["samples"] == 2
    predictions = (run_dir / "eval" / "predictions.jsonl").read_text()
    second = evaluate_run(run_dir, config)
    timeless = [{label: {k: v for k, v in scores.items() if k != "seconds"} for label, scores in r["results"].items()}
                for r in (first, second)]
    assert timeless[0] == timeless[1]
    assert (run_dir / "eval" / "predictions.jsonl").read_text() == predictions
    for label in ("base", "fine-tuned"):
        assert all(round(value * 2) == value * 2 for value in
                   (json.loads(line)[label]["exact_match"] for line in predictions.splitlines())
                   if not isinstance(value, bool))
    greedy = evaluate_run(run_dir, load_run_config(run_dir, ["evaluate.max_examples=6"]))
    assert greedy["generation"]["do_sample"] is False



def test_dpo_on_mined_pairs_is_judged_on_its_parents_held_out_examples(two_versions, tmp_path):
    import yaml

    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.train.preference import train_preference

    parent = shutil.copytree(two_versions[0], tmp_path / "parent")
    pairs = tmp_path / "pairs.jsonl"
    told, done = [], []
    mine_pairs(parent, pairs, samples=2, temperature=1.0, on_start=told.append, on_progress=done.append)
    assert told == [len(read_split(parent, "train"))] == [sum(done)]  # a progress bar with its total
    config_path = tmp_path / "dpo.yaml"
    config_path.write_text(yaml.safe_dump({
        "name": "child", "base_model": load_run_config(parent).base_model, "output_dir": str(tmp_path / "runs"),
        "data": {"train": "pairs.jsonl", "validation_fraction": 0.25, "max_length": 128},
        "train": {"method": "dpo", "max_steps": 2, "batch_size": 2, "precision": "fp32", "threads": 1,
                  "init_from": str(parent), "lora": {"r": 4, "alpha": 8}},
        "evaluate": {"test_file": "parent", "max_new_tokens": 8, "batch_size": 4, "json_output": True,
                     "general_check": False, "bootstrap_samples": 50}}))
    config = load_config(config_path)
    run_dir = prepare(config)
    train_preference(run_dir, config)
    report = evaluate_run(run_dir, config)
    held_out = [e.messages[-2].content for e in read_split(parent, "validation")]
    predictions = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in predictions] == held_out
    assert {"base", "parent", "fine-tuned"} <= set(report["results"])

    missing = load_config(config_path, [f"evaluate.test_file={tmp_path / 'absent.jsonl'}"])
    with pytest.raises(TunesmithError, match="does not exist"):
        evaluate_run(run_dir, missing)
    orphan = load_config(config_path, ["train.init_from=null"])
    with pytest.raises(TunesmithError, match="did not continue from another run"):
        evaluate_run(shutil.copytree(two_versions[1], tmp_path / "orphan"), orphan)


def test_a_rejected_answer_ends_just_after_its_first_wrong_word():
    from tunesmith.evaluate.mined_pairs import cut_after_first_mistake

    reference = '{"item": "chair", "quantity": 1, "city": "Cairo"}'
    assert cut_after_first_mistake('{"item": "chair", "quantity": 1, "city": "Stratosphere"}', reference) == \
        '{"item": "chair", "quantity": 1, "city": "Stratosphere'
    assert cut_after_first_mistake('{"item": "chairs", "quantity": 1, "city": "Cairo"}', reference) == '{"item": "chairs'
    assert cut_after_first_mistake('{"item": "chair", "quantity": 1, "city": "Cairo")', reference) == \
        '{"item": "chair", "quantity": 1, "city": "Cairo")'
    assert cut_after_first_mistake('{"item": "chair", "qua', reference) == '{"item": "chair", "qua'  # stopped early
