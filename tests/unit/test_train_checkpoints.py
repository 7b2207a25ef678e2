"""Checkpoints: only complete ones count, the newest wins, the last K are kept, interrupted writes leave nothing."""

from __future__ import annotations

import pytest
import torch

from tunesmith.train import checkpoints
from tunesmith.train.checkpoints import (CHECKPOINTS_DIR, complete_checkpoints, newest_complete_checkpoint,
                                         read_checkpoint, write_checkpoint)


def _write(run_dir, step, keep=3):
    return write_checkpoint(run_dir, step, {"w": torch.full((2,), float(step))}, {"optimizer": {"step": step}},
                            {"step": step}, {"adapter": "lora"}, keep)


def test_newest_complete_checkpoint_wins_and_old_ones_are_pruned(tmp_path):
    for step in (2, 4, 6, 8):
        _write(tmp_path, step, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000006", "step-00000008"]
    weights, state, progress = read_checkpoint(newest_complete_checkpoint(tmp_path))
    assert weights["w"].tolist() == [8.0, 8.0] and state["optimizer"]["step"] == 8 and progress["step"] == 8


def test_a_checkpoint_without_its_completeness_marker_is_ignored(tmp_path):
    _write(tmp_path, 2)
    torn = tmp_path / CHECKPOINTS_DIR / "step-00000009"
    torn.mkdir()
    (torn / checkpoints.WEIGHTS_FILE).write_bytes(b"half")
    assert newest_complete_checkpoint(tmp_path).name == "step-00000002"


def test_a_write_that_fails_midway_leaves_no_checkpoint_and_no_temp_folder(tmp_path, monkeypatch):
    _write(tmp_path, 2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        _write(tmp_path, 4)
    folder = tmp_path / CHECKPOINTS_DIR
    assert [p.name for p in folder.iterdir()] == ["step-00000002"]


def test_a_stop_signal_is_acknowledged_at_once_and_a_second_ctrl_c_interrupts(capsys):
    import os
    import signal

    from tunesmith.train.loop import StopSignals

    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == "SIGINT"
        assert "stopping after this step" in capsys.readouterr().err  # said before the step ends, not after
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) != signals._handle  # handlers given back
