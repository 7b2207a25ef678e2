"""The real `tunesmith` command on a tiny model: the whole chain, stage by stage, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import write_jsonl


def tunesmith(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "tunesmith", *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, env=env, timeout=600)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]  # user errors are one line
    return result


def test_run_chains_prepare_train_evaluate_and_prints_artifacts(tiny_config):
    result = tunesmith("run", tiny_config, "train.lora.r=8")
    assert result.returncode == 0, result.stderr
    run_dir = Path(yaml.safe_load(tiny_config.read_text())["output_dir"]) / "tiny"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"data", "train", "evaluate", "environment", "base_model"} <= manifest.keys()
    assert manifest["train"]["config"]["lora"]["r"] == 8  # the command-line override reached training
    for rel in ["adapter/adapter_model.safetensors", "eval/report.md", "eval/report.json", "config.yaml"]:
        assert (run_dir / rel).is_file(), rel
        assert str(run_dir / rel.split("/")[0]) in result.stdout
    assert "exact match" in result.stdout and "fine-tuned" in result.stdout


def test_stages_run_one_by_one_from_the_run_directory(tiny_config):
    prepared = tunesmith("prepare", tiny_config, "--show-mask", "1")
    assert prepared.returncode == 0, prepared.stderr
    assert "last trained token: '<|im_end|>'" in prepared.stdout
    run_dir = Path(yaml.safe_load(tiny_config.read_text())["output_dir"]) / "tiny"
    assert tunesmith("train", run_dir, "train.max_steps=2").returncode == 0
    assert json.loads((run_dir / "manifest.json").read_text())["train"]["metrics"]["steps"] == 2
    evaluated = tunesmith("evaluate", run_dir, "evaluate.max_examples=3")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((run_dir / "eval" / "report.json").read_text())["examples"] == 3


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error:")
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_bad_inputs_give_one_clear_message_and_no_run_directory(tiny_config, tmp_path):
    config = yaml.safe_load(tiny_config.read_text())
    runs = Path(config["output_dir"])

    assert_clean_failure(tunesmith("run", tmp_path / "nope.yaml"), "config file not found")
    assert_clean_failure(tunesmith("run", tiny_config, "train.lora.rank=8"), "train.lora.rank", "train.lora.r")
    assert_clean_failure(tunesmith("run", tiny_config, "train.batch_size=many"), "train.batch_size")

    broken = tmp_path / "broken.jsonl"
    broken.write_text(Path(config["data"]["train"]).read_text() + '{"messages": [\n', encoding="utf-8")
    assert_clean_failure(tunesmith("run", tiny_config, f"data.train={broken}"), f"{broken}:41", "not valid JSON")

    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    assert_clean_failure(tunesmith("run", tiny_config, f"data.train={unknown}"), "unknown data format")

    missing = tmp_path / "missing.jsonl"
    assert_clean_failure(tunesmith("run", tiny_config, f"data.train={missing}"), "data file not found")
    assert not runs.exists() or not any(runs.iterdir()), "a failed run left files behind"

    assert_clean_failure(tunesmith("train", tmp_path), "not a tunesmith run directory")
    assert_clean_failure(tunesmith("run", tiny_config, "base_model=/no/such/model"), "no such folder")


def test_an_existing_run_is_not_overwritten_without_asking(tiny_config):
    assert tunesmith("prepare", tiny_config).returncode == 0
    assert_clean_failure(tunesmith("prepare", tiny_config), "--overwrite")
    assert tunesmith("prepare", tiny_config, "--overwrite").returncode == 0


def test_help_lists_every_stage():
    result = tunesmith("--help")
    assert result.returncode == 0
    for command in ["run", "prepare", "train", "evaluate", "serve", "chat", "options"]:
        assert command in result.stdout
