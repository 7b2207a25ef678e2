"""`tunesmith train --nproc 2` (DDP, gloo on CPU) matches one process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tunesmith.config import load_config
from tunesmith.data.prepare import prepare
from tunesmith.train.sft import train_sft

SETTINGS = ["train.max_steps=6", "train.batch_size=4", "train.grad_accum=2", "train.learning_rate=0.01",
            "train.eval_steps=3"]


def test_two_gloo_processes_follow_the_single_process_loss_curve(tiny_config):
    single_config = load_config(tiny_config, ["name=single", *SETTINGS])
    single = train_sft(prepare(single_config), single_config)
    ddp_dir = prepare(load_config(tiny_config, ["name=ddp"]))
    result = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(ddp_dir), *SETTINGS, "--nproc", "2"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    ddp = json.loads((ddp_dir / "manifest.json").read_text())["train"]
    assert ddp["processes"] == 2 and single["processes"] == 1
    assert ddp["metrics"]["tokens_seen"] == single["metrics"]["tokens_seen"]
    for curve in ("loss_curve", "validation_curve"):
        assert [p["step"] for p in ddp[curve]] == [p["step"] for p in single[curve]]
        for ours, theirs in zip(ddp[curve], single[curve]):
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4), curve
    assert single["loss_curve"][-1]["loss"] < single["loss_curve"][0]["loss"]  # it really trained
