"""The evaluate stage on tiny trained runs: candidates, intervals, gates and exit codes, reports, judge, harness."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import order_rows, serving_on_loopback, write_jsonl
from typer.testing import CliRunner

from tunesmith.config import load_run_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.run import evaluate_run

FAST = ["evaluate.max_examples=6", "evaluate.max_new_tokens=6", "evaluate.bootstrap_samples=500"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two 4-step runs of the tiny model on the same data (different seeds): the run and a candidate."""
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.train.sft import train_sft

    root = tmp_path_factory.mktemp("eval-runs")
    data = write_jsonl(root / "orders.jsonl", order_rows(40))
    config = {"name": "orders", "base_model": str(tiny_model_dir), "output_dir": str(root / "runs"),
              "data": {"train": str(data), "validation_fraction": 0.2, "max_length": 128},
              "train": {"max_steps": 4, "batch_size": 4, "logging_steps": 1, "precision": "fp32",
                        "learning_rate": 0.05, "lora": {"r": 4, "alpha": 8}},
              "evaluate": {"max_new_tokens": 6, "batch_size": 4, "json_output": True}}
    (root / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    made = []
    for overrides in ([], ["name=rival", "seed=1"]):
        settings = load_config(root / "config.yaml", overrides)
        run_dir = prepare(settings)
        train_sft(run_dir, settings)
        made.append(run_dir)
    return made


def test_base_run_and_candidate_side_by_side_with_intervals_and_reports(runs):
    run_dir, rival = runs
    config = load_run_config(run_dir, [*FAST, "evaluate.general_questions=40"])
    report = evaluate_run(run_dir, config, candidates=[rival], gates=["general_ppl <= base * 100"])

    assert list(report["results"]) == ["base", "fine-tuned", "rival"]
    for label in ("fine-tuned", "rival"):
        metrics = report["comparisons"][label]["metrics"]
        assert {"exact_match", "token_f1", "rouge_l", "json_valid", "field:item", "general_qa"} <= metrics.keys()
        for result in metrics.values():
            assert result["delta_low"] <= result["delta"] <= result["delta_high"]
            assert result["wins"] + result["losses"] + result["ties"] in (6, 40)  # task examples or general questions
            assert 0 <= result["p_value"] <= 1
    # The adapters really differ from the base and from each other.
    losses = [report["results"][label]["validation_loss"] for label in ("base", "fine-tuned", "rival")]
    assert len(set(losses)) == 3
    for label in report["results"]:
        assert report["results"][label]["general_ppl"] > 1 and 0 <= report["results"][label]["general_qa"] <= 1
        low, high = report["intervals"][label]["token_f1"]
        assert low <= report["results"][label]["token_f1"] + 1e-4 and report["results"][label]["token_f1"] <= high + 1e-4
    assert report["passed"] and len(report["gates"]) == 2  # one gate, two non-base models

    eval_dir = run_dir / "eval"
    assert json.loads((eval_dir / "report.json").read_text()) == report
    markdown = (eval_dir / "report.md").read_text()
    assert "| rival vs base" in markdown and "## Gates" in markdown and "paired bootstrap" in markdown
    html = (eval_dir / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<polyline" in html and "http" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")  # self-contained: nothing fetched
    assert "class='example'" in html and "<b>reference</b>" in html
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"base", "fine-tuned", "rival"} <= rows[0].keys()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["evaluate"]["passed"] is True and manifest["evaluate"]["results"] == report["results"]


def test_a_failed_gate_exits_1_and_says_by_how_much(runs):
    from tunesmith.cli.main import app

    run_dir = runs[0]
    overrides = [*FAST, "evaluate.general_check=false"]
    failing = CliRunner().invoke(app, ["evaluate", str(run_dir), *overrides, "--gate", "exact_match >= base + 0.5"])
    assert failing.exit_code == 1, failing.output
    assert "gate FAILED: fine-tuned exact_match" in failing.output and "margin -0.5" in failing.output
    passing = CliRunner().invoke(app, ["evaluate", str(run_dir), *overrides, "--gate", "stop_rate >= 0"])
    assert passing.exit_code == 0, passing.output
    assert "gate passed" in passing.output


def test_bad_gates_and_options_fail_before_any_model_loads(runs):
    run_dir = runs[0]
    with pytest.raises(TunesmithError, match="examples:"):
        evaluate_run(run_dir, load_run_config(run_dir), gates=["exact_match >>> base"])
    with pytest.raises(TunesmithError, match="not a valid regular expression"):
        evaluate_run(run_dir, load_run_config(run_dir, ["evaluate.regex=(unclosed"]))
    with pytest.raises(TunesmithError, match="compare_base is false"):
        evaluate_run(run_dir, load_run_config(run_dir, ["evaluate.compare_base=false"]), gates=["exact_match >= base"])
    with pytest.raises(TunesmithError, match="custom metric|custom_metrics"):
        evaluate_run(run_dir, load_run_config(run_dir, ["evaluate.custom_metrics=[missing.py:f]"]))


def test_overfitting_flag_and_both_loss_curves_come_from_the_manifest(runs, tmp_path):
    copy = shutil.copytree(runs[0], tmp_path / "diverging")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["train"]["loss_curve"] = [{"step": s, "loss": 2.0 / s} for s in range(1, 9)]
    manifest["train"]["validation_curve"] = [{"step": 2, "loss": 1.5}, {"step": 4, "loss": 1.0}, {"step": 8, "loss": 1.6}]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    report = evaluate_run(copy, load_run_config(copy, [*FAST, "evaluate.general_check=false", "evaluate.compare_base=false"]))
    assert report["overfitting"]["overfitting"] and report["overfitting"]["best_step"] == 4
    assert list(report["results"]) == ["fine-tuned"] and report["comparisons"] == {}
    html = (copy / "eval" / "report.html").read_text()
    assert html.count("<polyline") == 2 and "validation loss rose 60%" in html


@pytest.fixture(scope="module")
def judge_url(runs):
    """`tunesmith serve`'s app on a loopback port, serving the tiny base model as the judge."""
    from tunesmith.serve.app import build_app
    from tunesmith.serve.engine import ServingEngine

    engine = ServingEngine.from_run_dir(runs[1], default_max_tokens=4)
    with serving_on_loopback(build_app(engine)) as url:
        yield f"{url}/v1", engine.base_name


def test_llm_judge_over_an_openai_compatible_endpoint_asks_both_orders(runs, judge_url):
    url, judge_model = judge_url
    run_dir = runs[0]
    config = load_run_config(run_dir, [*FAST, "evaluate.general_check=false", f"evaluate.judge.base_url={url}",
                                       f"evaluate.judge.model={judge_model}", "evaluate.judge.max_examples=3"])
    verdict = evaluate_run(run_dir, config)["judge"]["fine-tuned"]
    assert verdict["judged"] == 3 and verdict["model"] == judge_model
    assert verdict["wins"] + verdict["losses"] + verdict["ties"] + verdict["invalid"] == 3
    for row in verdict["examples"]:
        assert len(row["raw"]) == 2 and all(isinstance(text, str) for text in row["raw"])
    bad = load_run_config(run_dir, [*FAST, "evaluate.general_check=false", "evaluate.judge.base_url=http://127.0.0.1:9/v1",
                                    "evaluate.judge.model=x"])
    with pytest.raises(TunesmithError, match="cannot reach the judge"):
        evaluate_run(run_dir, bad)


def test_lm_evaluation_harness_task_from_local_files(runs, tmp_path):
    pytest.importorskip("lm_eval", reason="the [harness] extra is part of the test extra; install with .[test]")
    rows = [{"question": "What color is grass?", "choices": ["green", "red"], "label": 0},
            {"question": "How many legs does a dog have?", "choices": ["two", "four"], "label": 1},
            {"question": "What is frozen water?", "choices": ["ice", "steam"], "label": 0}]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(yaml.safe_dump({
        "task": "local_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}))
    run_dir = runs[0]
    config = load_run_config(run_dir, [*FAST, "evaluate.general_check=false", "evaluate.harness.tasks=[local_mc]",
                                       f"evaluate.harness.include_path={tasks}"])
    results = evaluate_run(run_dir, config)["results"]
    for label in ("base", "fine-tuned"):
        assert results[label]["harness:local_mc:acc"] in (0.0, 1 / 3, 2 / 3, 1.0) or \
            round(results[label]["harness:local_mc:acc"] * 3, 2) in (0, 1, 2, 3)
    missing = load_run_config(run_dir, ["evaluate.harness.tasks=[nope]", f"evaluate.harness.include_path={tasks}"])
    with pytest.raises(TunesmithError, match="nope not found"):
        evaluate_run(run_dir, missing)
