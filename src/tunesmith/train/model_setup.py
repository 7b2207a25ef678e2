"""Building the model to train: base weights, precision, and a LoRA / DoRA / QLoRA adapter or full fine-tuning.

Plain functions so every training method (SFT here, preference tuning beside it) sets models up the same way.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import LoraConfig, TrainConfig
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model
from tunesmith.train.cpu_attention import use_cpu_attention
from tunesmith.train.lora_fast_path import scale_lora_on_rank_side


def training_device():
    """The GPU when CUDA is present, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_adapter_supported(adapter: str, precision: str) -> None:
    """QLoRA needs CUDA and bitsandbytes, fp16 needs CUDA: say so before anything is loaded."""
    import torch

    if adapter == "qlora":
        if not torch.cuda.is_available():
            raise TunesmithError("train.adapter=qlora needs a CUDA GPU (4-bit NF4 via bitsandbytes); on CPU use "
                                 "train.adapter=lora, which trains the same kind of adapter on a bf16 base")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TunesmithError("train.adapter=qlora needs bitsandbytes: pip install bitsandbytes") from None
    if precision == "fp16" and not torch.cuda.is_available():
        raise TunesmithError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 or fp32 (or auto)")


def load_base_for_training(source: Path | str, adapter: str, precision: str):
    """The base model ready for training: fp32 weights (autocast does the bf16 work), or 4-bit NF4 for QLoRA."""
    import torch

    check_adapter_supported(adapter, precision)
    if adapter == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bf16" else torch.float16
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=quantization, dtype=compute,
                                                     device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_model(source)
    # A KV cache is useless in training and, with padding-free rows, hides the per-example attention mask.
    model.config.use_cache = False
    return model


def peft_lora_config(lora: LoraConfig, adapter: str):
    """peft's LoraConfig for our `train.lora` section and adapter kind (DoRA adds weight decomposition)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, use_rslora=lora.rslora,
                          use_dora=adapter == "dora", task_type="CAUSAL_LM")


def attach_adapter(model, train: TrainConfig, parent_adapter: Path | None = None):
    """Wrap the base with a fresh trainable adapter, or continue training a parent run's saved adapter."""
    from peft import PeftModel, get_peft_model

    if train.adapter == "full":
        model.requires_grad_(True)
        return model
    if parent_adapter is not None:
        return PeftModel.from_pretrained(model, str(parent_adapter), is_trainable=True)
    return get_peft_model(model, peft_lora_config(train.lora, train.adapter))


def build_training_model(base_source: Path | str, train: TrainConfig, precision: str, parent_adapter: Path | None = None):
    """Base model + adapter (or all weights trainable), in train mode, with gradient checkpointing if asked."""
    base = load_base_for_training(base_source, train.adapter, precision)
    if train.attention == "auto" and training_device().type == "cpu":
        use_cpu_attention(base)
    model = attach_adapter(base, train, parent_adapter)
    speed_up_adapter_layers(model, train.adapter, precision)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    return model


def speed_up_adapter_layers(model, adapter: str, precision: str) -> None:
    """The adapter-layer speed-ups training uses (the memory planner traces the same layers)."""
    if adapter == "full":
        return
    scale_lora_on_rank_side(model)
    if precision in ("bf16", "fp16"):
        skip_adapter_input_casts(model)


def skip_adapter_input_casts(model) -> None:
    """Under autocast, stop peft casting each adapter's input to the fp32 adapter weights' dtype.

    peft casts bf16 activations up to fp32 only for autocast to cast them straight back down for the adapter's
    matmul: two copies of every o_proj / down_proj input per layer, ~5% of a CPU step on the default model.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def trainable_parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
