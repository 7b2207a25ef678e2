"""SFT methods on a tiny model: DoRA, rank-stabilized LoRA, full fine-tuning, QLoRA's CPU message, continued
training from a parent run, gradient checkpointing, early stopping and the overfitting warning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.data.prepare import prepare
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model
from tunesmith.train.loop import SftLoop
from tunesmith.train.sft import train_sft


def _train(tiny_config, *overrides):
    config = load_config(tiny_config, list(overrides))
    run_dir = prepare(config)
    return run_dir, train_sft(run_dir, config)


def test_dora_with_rank_stabilized_scaling_trains_its_magnitude_vectors(tiny_config):
    run_dir, section = _train(tiny_config, "train.adapter=dora", "train.lora.rslora=true")
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] and adapter_config["use_rslora"]
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in name for name in weights)
    assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)
    assert section["method"] == "dora-sft"


def test_full_fine_tuning_saves_a_whole_model_whose_weights_moved(tiny_config, tiny_model_dir):
    run_dir, section = _train(tiny_config, "train.adapter=full", "train.learning_rate=0.001")
    assert section["adapter_dir"] is None and section["model_dir"] == "model"
    assert section["parameters"]["trainable"] == section["parameters"]["total"]
    tuned, base = load_model(run_dir / "model"), load_model(tiny_model_dir)
    moved = [name for (name, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters())
             if not torch.equal(a, b)]
    assert len(moved) > 10
    assert (run_dir / "model" / "tokenizer_config.json").is_file()


def test_a_full_fine_tune_is_evaluated_against_the_base_and_served_beside_it(tiny_config):
    from tunesmith.config import load_run_config
    from tunesmith.evaluate.run import evaluate_run
    from tunesmith.serve.engine import ServingEngine
    from tunesmith.serve.protocol import ChatCompletionRequest

    run_dir, _ = _train(tiny_config, "train.adapter=full", "train.learning_rate=0.003", "train.max_steps=12")
    config = load_run_config(run_dir, ["evaluate.max_examples=6", "evaluate.max_new_tokens=6",
                                       "evaluate.general_check=false", "evaluate.bootstrap_samples=200"])
    report = evaluate_run(run_dir, config)
    assert report["models"]["fine-tuned"]["full_fine_tune"]
    assert report["results"]["fine-tuned"]["validation_loss"] < report["results"]["base"]["validation_loss"] - 0.1

    engine = ServingEngine.from_run_dir(run_dir, default_max_tokens=4)
    assert engine.list_models() == [engine.adapter_name, engine.base_name]
    tuned = engine.models[engine.adapter_name].route.group.model
    base = engine.models[engine.base_name].route.group.model
    assert tuned is not base and not torch.equal(tuned.lm_head.weight, base.lm_head.weight)
    request = ChatCompletionRequest(model=engine.adapter_name, messages=[{"role": "user", "content": "hi"}])
    assert engine.generate(request).completion_tokens >= 1


def test_qlora_on_a_cpu_says_what_to_use_instead(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config(tiny_config, ["train.adapter=qlora"])
    with pytest.raises(TunesmithError, match="needs a CUDA GPU.*train.adapter=lora"):
        train_sft(prepare(config), config)


def test_continued_training_starts_from_the_parent_adapter_and_records_it(tiny_config):
    common = ["train.learning_rate=0.01", "train.max_steps=8"]
    parent_dir, parent = _train(tiny_config, "name=parent", *common)
    _, fresh = _train(tiny_config, "name=fresh", *common)
    child_dir, child = _train(tiny_config, "name=child", f"train.init_from={parent_dir}", *common)
    assert child["parent"]["name"] == "parent" and child["parent"]["run_dir"] == str(parent_dir.resolve())
    assert child["loss_curve"][0]["loss"] < fresh["loss_curve"][0]["loss"] - 0.5
    recorded = json.loads((child_dir / "manifest.json").read_text())["train"]["parent"]
    assert recorded["data_hash"] == parent["data_hash"]

    config = load_config(tiny_config, ["name=mismatch", f"train.init_from={parent_dir}", "train.adapter=full"])
    with pytest.raises(TunesmithError, match="set train.adapter=lora"):
        train_sft(prepare(config), config)


def test_gradient_checkpointing_changes_memory_not_the_losses(tiny_config):
    _, plain = _train(tiny_config, "name=plain", "train.lora.dropout=0")
    _, checkpointed = _train(tiny_config, "name=ckpt", "train.lora.dropout=0", "train.gradient_checkpointing=true")
    for a, b in zip(plain["loss_curve"], checkpointed["loss_curve"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_early_stopping_keeps_the_best_validation_and_warns_about_overfitting(tiny_config, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2])
    monkeypatch.setattr(SftLoop, "validation_loss", lambda self: next(scripted))
    _, section = _train(tiny_config, "train.max_steps=20", "train.eval_steps=2", "train.early_stopping_patience=3",
                        "train.learning_rate=0.05")
    assert section["stopped_early"] and section["metrics"]["steps"] == 10
    assert [p["step"] for p in section["validation_curve"]] == [2, 4, 6, 8, 10]
    assert section["metrics"]["validation_loss"] == 2.0 and section["metrics"]["best_validation_loss"] == 2.0
    assert any(w.startswith("overfitting") and "step 4" in w for w in section["warnings"])
