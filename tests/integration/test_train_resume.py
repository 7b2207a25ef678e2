"""Crash safety on a tiny model: SIGKILL then --resume, and SIGTERM then --resume, repeat the uninterrupted losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.data.prepare import prepare
from tunesmith.errors import TunesmithError
from tunesmith.train.checkpoints import complete_checkpoints
from tunesmith.train.sft import train_sft

STEPS = 40
SETTINGS = [f"train.max_steps={STEPS}", "train.checkpoint_steps=2", "train.keep_checkpoints=2", "train.eval_steps=10",
            "train.batch_size=8", "train.learning_rate=0.01", "train.lora.dropout=0.1"]


def _start_training(run_dir: Path, *extra: str, settings: list[str] = SETTINGS) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(run_dir), *settings, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_checkpoint_after(run_dir: Path, step: int, process: subprocess.Popen) -> int:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = complete_checkpoints(run_dir)
        newest = int(found[-1].name.split("-")[1]) if found else 0
        if newest > step:
            return newest
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def _curves(run_dir: Path) -> tuple[list, list]:
    trained = json.loads((run_dir / "manifest.json").read_text())["train"]
    return trained["loss_curve"], trained["validation_curve"]


def _assert_same_curve(resumed: list, reference: list) -> None:
    assert [p["step"] for p in resumed] == [p["step"] for p in reference]
    for ours, theirs in zip(resumed, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-7), (ours, theirs)


def test_sigkill_and_sigterm_then_resume_repeat_the_uninterrupted_loss_curve(tiny_config):
    reference_config = load_config(tiny_config, ["name=reference", *SETTINGS])
    reference_dir = prepare(reference_config)
    train_sft(reference_dir, reference_config)
    interrupted_dir = prepare(load_config(tiny_config, ["name=interrupted"]))
    nothing_yet = _start_training(interrupted_dir, "--resume")
    _, err = nothing_yet.communicate(timeout=120)
    assert nothing_yet.returncode == 2 and "holds no intact checkpoint" in err and "Traceback" not in err

    killed = _start_training(interrupted_dir)
    _wait_for_checkpoint_after(interrupted_dir, 2, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert "train" not in json.loads((interrupted_dir / "manifest.json").read_text())
    assert not (interrupted_dir / "adapter").exists()

    resumed = _start_training(interrupted_dir, "--resume")
    start = int(complete_checkpoints(interrupted_dir)[-1].name.split("-")[1])
    _wait_for_checkpoint_after(interrupted_dir, start, resumed)
    resumed.send_signal(signal.SIGTERM)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    stopped_at = int(complete_checkpoints(interrupted_dir)[-1].name.split("-")[1])
    assert start < stopped_at < STEPS

    # The command-line settings need not be repeated: a checkpoint carries the settings its run started with.
    finished = _start_training(interrupted_dir, "--resume", settings=[])
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    resumed_losses, resumed_validation = _curves(interrupted_dir)
    reference_losses, reference_validation = _curves(reference_dir)
    assert len(reference_losses) == STEPS
    _assert_same_curve(resumed_losses, reference_losses)
    _assert_same_curve(resumed_validation, reference_validation)


def test_a_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_config):
    config = load_config(tiny_config, ["train.max_steps=30", "train.checkpoint_steps=1", "train.keep_checkpoints=1",
                                       "train.learning_rate=1e30", "train.warmup_ratio=0", "train.max_grad_norm=null"])
    run_dir = prepare(config)
    with pytest.raises(TunesmithError, match=r"training loss became (nan|inf) at step \d+") as caught:
        train_sft(run_dir, config)
    assert "checkpoint" in str(caught.value) and "learning_rate" in str(caught.value)
    kept = complete_checkpoints(run_dir)
    assert len(kept) == 1 and int(kept[0].name.split("-")[1]) < 30
    assert "train" not in json.loads((run_dir / "manifest.json").read_text()) and not (run_dir / "adapter").exists()
