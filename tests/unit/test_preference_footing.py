"""DPO on SFT's crash-safe footing, on a tiny model: hashed checkpoints, SIGTERM then an exact --resume, the NaN
guard, the validation curve in the manifest and the one overfitting rule reading it, early stopping."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
from safetensors.torch import load_file

from tunesmith.errors import TunesmithError
from tunesmith.registry.overfitting import overfitting_check
from tunesmith.registry.run_dir import MANIFEST, read_json
from tunesmith.train.checkpoints import (CHECKPOINTS_DIR, checkpoint_problem, complete_checkpoints,
                                         newest_intact_checkpoint)
from tunesmith.train.loop import TrainingStopped
from tunesmith.train.preference import train_preference
from tunesmith.train.trl_footing import TRAINER_DIR

from test_preference import make_preference_run

# 18 training pairs in steps of 4: the run crosses an epoch; dropout makes the RNG state matter on resume.
FOOTING = {"max_steps": 6, "checkpoint_steps": 2, "keep_checkpoints": 2, "eval_steps": 2, "threads": 1,
           "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """A DPO run trained start to end in one go: (run_dir, manifest train section)."""
    run_dir, config = make_preference_run(tmp_path_factory.mktemp("uninterrupted"), tiny_model_dir, overrides=FOOTING)
    return run_dir, train_preference(run_dir, config)


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_checkpoints_hash_the_trainers_state_and_a_damaged_one_is_skipped(uninterrupted, tmp_path):
    run_dir, _ = uninterrupted
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]  # not the last step
    newest = complete_checkpoints(run_dir)[-1]
    hashed = json.loads((newest / "files.json").read_text())
    assert {"trainable.safetensors", "progress.json", "config.json", f"{TRAINER_DIR}/optimizer.pt",
            f"{TRAINER_DIR}/trainer_state.json", f"{TRAINER_DIR}/adapter_model.safetensors"} <= set(hashed)
    assert checkpoint_problem(newest) is None
    progress = json.loads((newest / "progress.json").read_text())
    assert progress["step"] == 4 and [p["step"] for p in progress["validation_curve"]] == [2, 4]

    copy = tmp_path / "run"
    shutil.copytree(run_dir / CHECKPOINTS_DIR, copy / CHECKPOINTS_DIR)
    damaged = copy / CHECKPOINTS_DIR / newest.name / TRAINER_DIR / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:-8])
    chosen, skipped = newest_intact_checkpoint(copy)
    assert chosen.name == "step-00000002"
    assert skipped == [f"{newest.name}: {TRAINER_DIR}/optimizer.pt changed since it was written (sha256 mismatch)"]


def test_sigterm_saves_a_checkpoint_and_resume_ends_with_the_uninterrupted_weights(uninterrupted, tmp_path,
                                                                                   tiny_model_dir):
    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, overrides=FOOTING)

    def terminate_during_step_3(progress, total_steps):
        if progress.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped) as stopped:
        train_preference(run_dir, config, on_step=terminate_during_step_3)
    assert stopped.value.step == 3 and stopped.value.checkpoint.name == "step-00000003"
    assert checkpoint_problem(stopped.value.checkpoint) is None
    assert not (run_dir / "adapter").exists() and "train" not in read_json(run_dir / MANIFEST)
    with pytest.raises(TunesmithError, match="holds checkpoints of an earlier attempt.*--resume.*--restart"):
        train_preference(run_dir, config)

    section = train_preference(run_dir, config, resume=True)
    expected_dir, expected = uninterrupted
    assert section["resumed_from"] == "checkpoints/step-00000003" and section["metrics"]["steps"] == 6
    for name, tensor in _adapter(expected_dir).items():
        assert _adapter(run_dir)[name].allclose(tensor, atol=1e-6), name
    for curve in ("loss_curve", "validation_curve"):
        assert [p["step"] for p in section[curve]] == [p["step"] for p in expected[curve]]
        assert [p["loss"] for p in section[curve]] == pytest.approx([p["loss"] for p in expected[curve]], abs=1e-5)


def test_the_validation_curve_is_in_the_manifest_for_the_overfitting_check(uninterrupted):
    run_dir, section = uninterrupted
    train = read_json(run_dir / MANIFEST)["train"]
    assert [p["step"] for p in train["validation_curve"]] == [2, 4, 6]  # every eval_steps and the last step
    assert train["stopped_early"] is False and train["resumed_from"] is None and train["metrics"]["steps"] == 6
    assert train["metrics"]["validation_loss"] == round(train["validation_curve"][-1]["loss"], 4)
    verdict = overfitting_check(train, tolerance=0.10)
    assert verdict["status"] == "ok" and verdict["validation_curve"] == train["validation_curve"]


def test_early_stopping_keeps_the_best_weights_and_the_rule_flags_the_divergence(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    from trl import DPOTrainer

    scripted = iter([0.6, 0.5, 0.7, 0.8])  # the best at step 2, then 40% above it while training loss falls
    evaluation_loop = DPOTrainer.evaluation_loop

    def scripted_validation(self, *args, **kwargs):
        output = evaluation_loop(self, *args, **kwargs)
        output.metrics["eval_loss"] = next(scripted)
        return output

    monkeypatch.setattr(DPOTrainer, "evaluation_loop", scripted_validation)
    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, overrides={
        **FOOTING, "max_steps": 10, "eval_steps": 1, "checkpoint_steps": 0, "early_stopping_patience": 1})
    section = train_preference(run_dir, config)

    assert section["stopped_early"] and section["metrics"]["steps"] == 3
    assert section["metrics"]["validation_loss"] == 0.5 == section["metrics"]["best_validation_loss"]
    assert section["loss_curve"][-1]["loss"] < section["loss_curve"][1]["loss"]  # what makes it overfitting
    assert any(w.startswith("overfitting") and "step 2" in w for w in section["warnings"])
    assert overfitting_check(read_json(run_dir / MANIFEST)["train"], tolerance=0.10)["overfitting"]


def test_a_nan_loss_stops_before_its_update_naming_the_step(tmp_path, tiny_model_dir, monkeypatch):
    from trl import DPOTrainer

    compute_loss = DPOTrainer.compute_loss

    def nan_at_step_2(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if model.training and self.state.global_step == 1 else loss

    monkeypatch.setattr(DPOTrainer, "compute_loss", nan_at_step_2)
    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, overrides={**FOOTING, "checkpoint_steps": 1})
    with pytest.raises(TunesmithError, match=r"training loss became nan at step 2: .*--resume"):
        train_preference(run_dir, config)
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-00000001"]  # the last good one is kept
    assert not (run_dir / "adapter").exists() and "train" not in read_json(run_dir / MANIFEST)

    monkeypatch.setattr(DPOTrainer, "compute_loss", compute_loss)
    config = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 1})})
    assert train_preference(run_dir, config, restart=True)["metrics"]["steps"] == 1
    assert not complete_checkpoints(run_dir)  # --restart deleted the earlier attempt's
