"""The learning rate when `train.learning_rate` is unset: chosen from the model's width and the method.

SFT follows the scaling rule published with Thinking Machines' "LoRA Without Regret" study (the Tinker
cookbook's `get_lr`): lr = 5e-5 x 10 (LoRA; 1 for full fine-tuning) x (2000 / hidden_size) ** p, with p fitted
per model family (0.781 for Llama-style models, 0.0775 for Qwen). For SmolLM2-135M (hidden 576) it gives
1.3e-3 for LoRA; on the quickstart data lr 1e-3 reached validation loss 0.0010 where 2e-4 reached 0.0068
(bench/train_speed.py). Preference tuning (and a model whose width is unknown) gets fixed rates: 2e-4 for
adapters, 2e-5 for all weights.
"""

from __future__ import annotations

BASE = 5e-5
LORA_MULTIPLIER = 10.0
FAMILY_EXPONENT = {"qwen": 0.0775}
DEFAULT_EXPONENT = 0.781
FIXED_ADAPTER_LR = 2e-4  # adapters; all weights get a tenth


def default_learning_rate(model_config, adapter: str, method: str) -> float:
    """The peak learning rate for this model, adapter kind and method, rounded to 2 significant digits."""
    multiplier = 1.0 if adapter == "full" else LORA_MULTIPLIER
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    if method != "sft" or not hidden:  # preference tuning, or a model whose width we cannot read
        return FIXED_ADAPTER_LR * multiplier / LORA_MULTIPLIER
    model_type = str(getattr(model_config, "model_type", ""))
    exponent = next((p for family, p in FAMILY_EXPONENT.items() if model_type.startswith(family)), DEFAULT_EXPONENT)
    return float(f"{BASE * multiplier * (2000 / hidden) ** exponent:.2g}")


def with_learning_rate(settings, model_config):
    """`settings` with `learning_rate` filled in when it was left unset (so manifests and checkpoints record it)."""
    if settings.learning_rate is not None:
        return settings
    rate = default_learning_rate(model_config, settings.adapter, settings.method)
    return settings.model_copy(update={"learning_rate": rate})
