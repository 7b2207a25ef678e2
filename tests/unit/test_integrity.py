"""Integrity is checked, not assumed: damaged checkpoints are skipped for intact ones, an earlier attempt's
checkpoints are never deleted silently, and changed or incomplete adapters are refused before they answer."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tunesmith.config import load_config
from tunesmith.data.prepare import prepare
from tunesmith.errors import TunesmithError
from tunesmith.registry.run_dir import read_json, write_json_atomic
from tunesmith.train.checkpoints import (STATE_FILE, WEIGHTS_FILE, checkpoint_problem, complete_checkpoints,
                                         newest_intact_checkpoint, write_checkpoint)
from tunesmith.train.sft import train_sft


def _write(run_dir, step):
    weights = {"a": torch.full((4,), float(step)), "b": torch.ones(2)}
    return write_checkpoint(run_dir, step, weights, {"optimizer": {}}, {"step": step}, {"adapter": "lora"}, keep=3)


def test_a_checkpoint_with_half_its_tensors_or_a_lost_file_is_skipped_for_the_previous_one(tmp_path):
    older, newer = _write(tmp_path, 2), _write(tmp_path, 4)
    half = load_file(str(newer / WEIGHTS_FILE))
    save_file({"a": half["a"]}, str(newer / WEIGHTS_FILE))  # valid safetensors, one tensor short
    assert "trainable.safetensors changed since it was written" in checkpoint_problem(newer)
    chosen, skipped = newest_intact_checkpoint(tmp_path)
    assert chosen == older and skipped == [f"{newer.name}: trainable.safetensors changed since it was written "
                                           "(sha256 mismatch)"]
    (older / STATE_FILE).unlink()
    assert newest_intact_checkpoint(tmp_path) == (None, [skipped[0], f"{older.name}: {STATE_FILE} is missing"])


@pytest.fixture
def checkpointed_run(tiny_config):
    """A tiny run trained to the end with checkpoints left at steps 2 and 4 of 6."""
    config = load_config(tiny_config, ["train.max_steps=6", "train.checkpoint_steps=2", "train.keep_checkpoints=3"])
    run_dir = prepare(config)
    train_sft(run_dir, config)
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    return run_dir, config


def test_resume_falls_back_from_a_damaged_newest_checkpoint_and_says_so(checkpointed_run, capfd):
    run_dir, config = checkpointed_run
    newest = complete_checkpoints(run_dir)[-1]
    data = (newest / WEIGHTS_FILE).read_bytes()
    (newest / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])  # truncated
    section = train_sft(run_dir, config, resume=True)
    assert section["resumed_from"] == "checkpoints/step-00000002" and section["metrics"]["steps"] == 6
    assert "checkpoint step-00000004: trainable.safetensors changed" in capfd.readouterr().err


def test_training_again_never_deletes_an_earlier_attempts_checkpoints_unasked(checkpointed_run):
    run_dir, config = checkpointed_run
    with pytest.raises(TunesmithError, match="holds checkpoints of an earlier attempt.*--resume.*--restart"):
        train_sft(run_dir, config)
    assert len(complete_checkpoints(run_dir)) == 2
    assert train_sft(run_dir, config, restart=True)["resumed_from"] is None


def test_a_changed_or_incomplete_adapter_is_refused_before_it_answers(checkpointed_run):
    from tunesmith.serve.engine import ServingEngine

    run_dir, _ = checkpointed_run
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(adapter))
    save_file({"unrelated.weight": torch.zeros(2)}, str(adapter))  # valid safetensors, no LoRA tensors
    with pytest.raises(TunesmithError, match="changed after training"):
        ServingEngine.from_run_dir(run_dir)
    manifest = read_json(run_dir / "manifest.json")  # a run trained before weights were hashed
    del manifest["train"]["weights_sha256"]
    write_json_atomic(run_dir / "manifest.json", manifest)
    with pytest.raises(TunesmithError, match=f"holds 0 of the {len(tensors)} tensors its adapter_config.json promises"):
        ServingEngine.from_run_dir(run_dir)
    adapter.write_bytes(b"not a safetensors file")
    with pytest.raises(TunesmithError, match="the adapter cannot be loaded"):
        ServingEngine.from_run_dir(run_dir)


def test_ctrl_c_during_run_ends_with_how_to_continue_not_a_traceback(tiny_config, monkeypatch):
    import tunesmith.cli.main as cli
    from tunesmith.train.loop import TrainingStopped

    def stopped(run_dir, *args, **kwargs):
        raise TrainingStopped(3, run_dir / "checkpoints" / "step-00000003", "SIGINT")

    monkeypatch.setattr(cli, "_train_stage", stopped)
    result = CliRunner().invoke(cli.app, ["run", str(tiny_config)])
    assert result.exit_code == 130 and not isinstance(result.exception, TrainingStopped)
    assert "continue with `tunesmith train" in result.output and "--resume" in result.output


def test_the_top_level_error_line_prints_user_text_as_written(tmp_path, monkeypatch, capsys):
    from tunesmith.cli.main import main

    missing = tmp_path / "[/]odd[bold]" / "config.yaml"
    monkeypatch.setattr("sys.argv", ["tunesmith", "prepare", str(missing)])
    with pytest.raises(SystemExit) as stopped:
        main()
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "error:" in error and "[/]odd[bold]" in error.replace("\n", "")
