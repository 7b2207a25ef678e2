"""A training checkpoint's LoRA weights as a peft adapter folder a server loads (adapter_config.json + safetensors).

Training checkpoints hold the trainable tensors under the training model's parameter names plus optimizer state;
peft's own `get_peft_model_state_dict` renames them, run on a weightless (meta-device) copy of the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunesmith.config import TrainConfig
from tunesmith.registry.run_dir import staged_dir
from tunesmith.train.checkpoints import WEIGHTS_FILE

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class CheckpointExporter:
    """Writes checkpoints of one run (one base model, one adapter config) as peft folders."""

    def __init__(self, base_source: Path | str, train: TrainConfig):
        self.base_source, self.train = str(base_source), train
        self._skeleton = None

    def export(self, checkpoint: Path, target: Path) -> Path:
        """`target` holding the checkpoint's adapter and the base's tokenizer; written whole or not at all."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        skeleton = self._weightless_peft_model()
        weights = get_peft_model_state_dict(skeleton, state_dict=load_file(str(Path(checkpoint) / WEIGHTS_FILE)))
        with staged_dir(Path(target)) as staging:
            save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(staging / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            skeleton.peft_config["default"].save_pretrained(str(staging))
            self._save_tokenizer(staging)
        return Path(target)

    def copy_trained(self, adapter_dir: Path, target: Path) -> Path:
        """`target` holding a copy of a finished run's adapter folder (already in peft's format)."""
        with staged_dir(Path(target)) as staging:
            shutil.copytree(adapter_dir, staging, dirs_exist_ok=True)
        return Path(target)

    def _weightless_peft_model(self):
        if self._skeleton is None:
            import torch
            from peft import get_peft_model
            from transformers import AutoConfig, AutoModelForCausalLM

            from tunesmith.train.model_setup import peft_lora_config

            with torch.device("meta"):  # the module tree and names only: no memory, no weights read
                base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.base_source))
                self._skeleton = get_peft_model(base, peft_lora_config(self.train.lora, self.train.adapter))
            self._skeleton.peft_config["default"].base_model_name_or_path = self.base_source
        return self._skeleton

    def _save_tokenizer(self, folder: Path) -> None:
        from tunesmith.models import load_tokenizer

        load_tokenizer(self.base_source).save_pretrained(str(folder))
