"""LoRA SFT on a tiny model: the adapter really changes, is saved with its tokenizer, and the manifest records it."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.data.prepare import prepare
from tunesmith.train.sft import train_sft


def test_training_writes_an_adapter_whose_weights_moved(tiny_config):
    config = load_config(tiny_config)
    run_dir = prepare(config)
    section = train_sft(run_dir, config)

    adapter = run_dir / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b, "no LoRA weights saved"
    # peft initialises lora_B to zero: non-zero values prove the optimizer updated the adapter.
    assert any(tensor.abs().sum() > 0 for tensor in lora_b)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (adapter / "tokenizer_config.json").is_file()
    assert "<|im_start|>" in (adapter / "chat_template.jinja").read_text()
    assert not list(run_dir.glob(".adapter.tmp-*")) and not (adapter / "_trainer").exists()

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["train"]["metrics"]["steps"] == 4
    assert manifest["train"]["data_hash"] == manifest["data"]["dataset_hash"]
    assert manifest["train"]["metrics"]["tokens_seen"] > 0
    assert len(manifest["train"]["loss_curve"]) == 4
    assert manifest["environment"]["libraries"]["transformers"]
    assert section["parameters"]["trainable"] < section["parameters"]["total"]


def test_training_lowers_the_loss_on_a_repeated_batch(tiny_config):
    config = load_config(tiny_config, ["train.max_steps=30", "train.learning_rate=0.05", "train.lora.r=16"])
    run_dir = prepare(config)
    curve = train_sft(run_dir, config)["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"] * 0.6
