"""An unset learning rate is chosen from the model's width and method, and the chosen number is recorded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tunesmith.config import load_config
from tunesmith.data.prepare import prepare
from tunesmith.train.learning_rate import default_learning_rate
from tunesmith.train.sft import train_sft

SMOLLM2 = SimpleNamespace(hidden_size=576, model_type="llama")
LLAMA_8B = SimpleNamespace(hidden_size=4096, model_type="llama")
QWEN = SimpleNamespace(hidden_size=896, model_type="qwen2")


@pytest.mark.parametrize("model, adapter, method, expected", [
    (SMOLLM2, "lora", "sft", 1.3e-3),
    (SMOLLM2, "full", "sft", 1.3e-4),
    (LLAMA_8B, "lora", "sft", 2.9e-4),  # wider models get smaller rates
    (QWEN, "dora", "sft", 5.3e-4),
    (SMOLLM2, "lora", "dpo", 2e-4),
    (SMOLLM2, "full", "kto", 2e-5),
    (SimpleNamespace(model_type="mystery"), "lora", "sft", 2e-4),
])
def test_default_learning_rate_follows_width_adapter_and_method(model, adapter, method, expected):
    assert default_learning_rate(model, adapter, method) == pytest.approx(expected)


def test_the_chosen_rate_is_recorded_in_the_manifest(tiny_config):
    config = load_config(tiny_config, ["train.max_steps=2"])
    assert config.train.learning_rate is None
    section = train_sft(prepare(config), config)
    tiny = SimpleNamespace(hidden_size=32, model_type="llama")
    assert section["config"]["learning_rate"] == default_learning_rate(tiny, "lora", "sft") == pytest.approx(0.013)
