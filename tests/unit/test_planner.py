"""Memory planner on a tiny model: exact parameter-based components, traced activations that scale, device verdicts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tunesmith.cli.main import app
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.train.planner import GIB, NF4_BYTES_PER_PARAM, parse_device, plan_memory


def plans_by_mode(config, device="cpu:64GB"):
    return {plan.mode: plan for plan in plan_memory(config, parse_device(device))}


def test_parameter_components_match_the_real_model_and_adapter(tiny_config, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from tunesmith.models import load_model

    config = load_config(tiny_config)
    plans = plans_by_mode(config)
    model = load_model(tiny_model_dir)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once, as in memory
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if type(m).__name__ == "Linear" and "lm_head" not in name)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapter = peft_model.get_nb_trainable_parameters()[0]

    full, lora, qlora = plans["full"], plans["lora"], plans["qlora"]
    assert full.trainable == total and full.components["weights"] == total * 4
    assert full.components["gradients"] == total * 4 and full.components["optimizer states"] == total * 8
    assert lora.trainable == adapter and lora.components["lora adapter"] == adapter * 4
    assert lora.components["optimizer states"] == adapter * 8 and lora.components["weights"] == total * 4
    # QLoRA: the decoder's linear weights in NF4, everything else (embeddings, norms) in bf16.
    assert qlora.components["weights"] == int((total - linear) * 2 + linear * NF4_BYTES_PER_PARAM)
    assert any("CUDA" in note for note in qlora.notes)
    # Full-weight DPO holds a frozen reference copy of the model beside the one it trains.
    assert plans_by_mode(load_config(tiny_config, ["train.method=dpo"]))["full"].components["weights"] == 2 * total * 4


def test_activations_grow_with_batch_sequence_and_preference_pairs(tiny_config):
    def activations(*overrides):
        return plans_by_mode(load_config(tiny_config, list(overrides)))["lora"].components["activations"]

    base = activations("train.batch_size=2", "data.max_length=64")
    assert base > 0
    assert activations("train.batch_size=4", "data.max_length=64") == pytest.approx(2 * base, rel=0.15)
    assert activations("train.batch_size=2", "data.max_length=128") > 1.8 * base
    # DPO runs chosen and rejected together: more than SFT at the same batch size, and linear in the batch.
    dpo = activations("train.batch_size=2", "data.max_length=64", "train.method=dpo")
    assert dpo > 1.5 * base
    assert activations("train.batch_size=4", "data.max_length=64", "train.method=dpo") == pytest.approx(2 * dpo, rel=0.15)


def test_fits_verdict_follows_the_device_size(tiny_config):
    config = load_config(tiny_config)
    assert all(plan.fits for plan in plans_by_mode(config, "cpu:64GB").values())
    tight = plans_by_mode(config, "cuda:0.0001GB")
    assert not any(plan.fits for plan in tight.values())
    assert tight["full"].components["runtime"] > 0.5 * GIB  # the CUDA context is counted on a GPU


@pytest.mark.parametrize("spec, kind, gib", [("cuda:80GB", "cuda", 80), ("cpu:16GiB", "cpu", 16), ("gpu:24G", "cuda", 24)])
def test_device_sizes_parse(spec, kind, gib):
    device = parse_device(spec)
    assert device.kind == kind and device.memory == gib * GIB


def test_unknown_device_is_one_clear_error():
    with pytest.raises(TunesmithError, match="cuda:80GB"):
        parse_device("tpu:8")


def test_plan_command_prints_json_and_rejects_a_bad_device(tiny_config):
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(tiny_config), "--device", "cuda:80GB", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [p["mode"] for p in report["plans"]] == ["full", "lora", "qlora"]
    assert all(p["fits"] is True for p in report["plans"]) and report["device"]["memory_bytes"] == 80 * GIB
    for plan in report["plans"]:
        assert plan["total_bytes"] == sum(plan["components_bytes"].values())

    table = runner.invoke(app, ["plan", str(tiny_config), "train.batch_size=2"])
    assert table.exit_code == 0 and "activations" in table.output and "batch 2" in table.output

    bad = runner.invoke(app, ["plan", str(tiny_config), "--device", "abacus"])
    assert bad.exit_code != 0 and isinstance(bad.exception, TunesmithError)
