"""`tunesmith data inspect / prepare / check` on the tiny model, including a failing pre-flight check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from conftest import order_rows, write_jsonl
from typer.testing import CliRunner

from tunesmith.cli.main import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_inspect_reports_formats_problems_duplicates_and_pii_without_writing(tmp_path):
    rows = order_rows(5)
    rows[1]["messages"][0]["content"] += " (reach me at bob@example.org)"
    path = write_jsonl(tmp_path / "d.jsonl", rows + [rows[0], {"messages": [{"role": "user", "content": "only"}]}])
    result = invoke("data", "inspect", path)
    assert result.exit_code == 0, result.output
    assert "7 rows, 6 valid" in result.output and "{'chat': 6}" in result.output
    assert "1 exact duplicates" in result.output
    assert "no_assistant_turn" in result.output and f"{path}:7" in result.output
    assert "1 email" in result.output
    assert {p.name for p in tmp_path.iterdir()} <= {"d.jsonl", "home"}  # nothing written beside the data


def test_inspect_of_a_missing_file_says_it_does_not_exist_without_naming_config_keys(tmp_path):
    result = invoke("data", "inspect", tmp_path / "nope.jsonl")
    assert result.exit_code != 0
    message = result.output + str(result.exception or "")
    assert f"{tmp_path / 'nope.jsonl'} does not exist" in message and "data.train" not in message


def test_inspect_with_a_model_flags_its_special_tokens_in_content(tmp_path, tiny_model_dir):
    rows = order_rows(3)
    rows[2]["messages"][1]["content"] += "<|im_end|>"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert "special_tokens" not in invoke("data", "inspect", path).output
    result = invoke("data", "inspect", path, "--model", tiny_model_dir)
    assert result.exit_code == 0 and "special_tokens" in result.output and f"{path}:3" in result.output


def test_prepare_then_check_passes_and_a_benchmark_that_overlaps_train_fails(tmp_path, tiny_config):
    prepared = invoke("data", "prepare", tiny_config)
    assert prepared.exit_code == 0, prepared.output
    assert "read 40 = kept 40 + dropped 0" in prepared.output and "card.md" in prepared.output
    run_dir = tmp_path / "runs" / "tiny"
    checked = invoke("data", "check", run_dir, "--examples", "2")
    assert checked.exit_code == 0, checked.output
    assert checked.output.count("loss mask") == 2 and "NO" not in checked.output

    train_rows = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    benchmark = write_jsonl(tmp_path / "bench.jsonl", train_rows[:3] + order_rows(300)[200:205])
    env = {**os.environ, "COLUMNS": "200"}
    failed = subprocess.run([sys.executable, "-m", "tunesmith", "data", "check", str(run_dir), "--against", str(benchmark)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("error: pre-flight check failed: benchmark rows vs train")
    assert "3 overlapping (lines 1, 2, 3)" in failed.stderr


def test_check_fails_when_the_chat_template_changed_since_prepare(tmp_path, tiny_config):
    assert invoke("data", "prepare", tiny_config).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["data"]["chat_template_sha"] = "0" * 16
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("data", "check", run_dir)
    assert result.exit_code == 2 and "chat template" in result.output and "Traceback" not in result.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["dedup"] == "near"
