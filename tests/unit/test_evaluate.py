"""Evaluation: JSON-aware metrics, stop detection, and a base-vs-fine-tuned report on a tiny run."""

from __future__ import annotations

import json

from tunesmith.config import load_config
from tunesmith.data.prepare import prepare
from tunesmith.evaluate.generate import Generation
from tunesmith.evaluate.metrics import is_exact_match, score_generations
from tunesmith.evaluate.run import evaluate_run
from tunesmith.models import load_tokenizer
from tunesmith.train.sft import train_sft


def test_json_exact_match_ignores_key_order_and_spacing_but_not_values():
    reference = '{"item": "mug", "quantity": 3}'
    assert is_exact_match('{"quantity":3,"item":"mug"}', reference, json_output=True)
    assert not is_exact_match('{"item": "mug", "quantity": "3"}', reference, json_output=True)
    assert not is_exact_match('```json\n{"item": "mug", "quantity": 3}\n```', reference, json_output=True)
    assert is_exact_match("  Hello   World ", "hello world", json_output=False)


def test_scores_count_valid_json_and_stops():
    outputs = [Generation('{"a": 1}', 5, True), Generation("not json", 64, False),
               Generation('{"a": 2}', 5, True), Generation("[1, 2]", 4, True)]
    scores = score_generations(outputs, ['{"a": 1}'] * 4, json_output=True)
    assert scores["exact_match"] == 0.25
    assert scores["json_valid"] == 0.5  # a JSON array is not an object
    assert scores["stop_rate"] == 0.75


def test_evaluate_writes_a_side_by_side_report(tiny_config):
    config = load_config(tiny_config)
    run_dir = prepare(config)
    train_sft(run_dir, config)
    report = evaluate_run(run_dir, config)

    assert set(report["results"]) == {"base", "fine-tuned"}
    for scores in report["results"].values():
        assert {"exact_match", "json_valid", "stop_rate", "validation_loss", "perplexity"} <= scores.keys()
    # The adapter was trained, so its validation loss must differ from the base model's.
    assert report["results"]["base"]["validation_loss"] != report["results"]["fine-tuned"]["validation_loss"]
    eval_dir = run_dir / "eval"
    assert json.loads((eval_dir / "report.json").read_text()) == report
    markdown = (eval_dir / "report.md").read_text()
    assert "| exact match |" in markdown and "base" in markdown and "fine-tuned" in markdown
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["examples"] > 0
    assert {"base", "fine-tuned", "reference", "prompt"} <= rows[0].keys()
    assert json.loads((run_dir / "manifest.json").read_text())["evaluate"]["results"] == report["results"]
