"""Preference tuning (DPO, KTO) of a LoRA adapter on TRL's trainers, from the base model or an earlier run's adapter."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.template import template_fingerprint
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model, load_tokenizer
from tunesmith.registry.run_dir import read_manifest, staged_dir, update_manifest
from tunesmith.train.devices import pick_precision, set_cpu_threads
from tunesmith.train.preference_data import ACCEPTED_KINDS, preference_kind, read_preference_rows, trl_rows
from tunesmith.train.progress import RichProgressCallback

ADAPTER_DIR = "adapter"
# TRL's evaluation metric -> the manifest's name for it (KTO logs no pairwise accuracy).
PREFERENCE_METRICS = {
    "eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin",
    "eval_rewards/chosen": "chosen_reward", "eval_rewards/rejected": "rejected_reward", "eval_kl": "kl",
}


def train_preference(run_dir: Path, config: RunConfig) -> dict:
    """Train a LoRA adapter with DPO or KTO on the run's preference split; write `<run_dir>/adapter` and manifest `train`."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import PrinterCallback, set_seed

    run_dir = Path(run_dir)
    method = config.train.method
    if method not in ACCEPTED_KINDS:
        raise TunesmithError(f"train.method={method} is not a preference method; choose one of {', '.join(ACCEPTED_KINDS)}")
    manifest = read_manifest(run_dir)
    kind = preference_kind(run_dir, manifest, method)
    base_source = manifest["base_model"]["source"]
    tokenizer = load_tokenizer(base_source)
    if template_fingerprint(tokenizer) != manifest["data"]["chat_template_sha"]:
        raise TunesmithError(f"{run_dir}: the base model's chat template changed since `prepare`; re-run prepare")
    parent = parent_run_record(run_dir, manifest, config.train.preference.parent_run)
    set_seed(config.seed)
    threads = set_cpu_threads(config.train.threads)
    precision = pick_precision(config.train.precision)
    train_set = Dataset.from_list(trl_rows(read_preference_rows(run_dir, "train", kind)))
    val_set = Dataset.from_list(trl_rows(read_preference_rows(run_dir, "validation", kind)))

    model = load_model(base_source)
    peft_config = None
    if parent:
        # The parent's adapter is trained further; TRL keeps a frozen copy of it as the reference policy.
        model = PeftModel.from_pretrained(model, str(parent["adapter_path"]), is_trainable=True)
    else:
        lora = config.train.lora
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, task_type="CAUSAL_LM")
    started = time.perf_counter()
    with staged_dir(run_dir / ADAPTER_DIR) as staging:
        args = _trainer_arguments(config, precision, staging / "_trainer", use_cpu=not torch.cuda.is_available())
        trainer_cls = _trainer_class(method)
        trainer = trainer_cls(model=model, args=args, processing_class=tokenizer, train_dataset=train_set,
                              eval_dataset=val_set, peft_config=peft_config, callbacks=[RichProgressCallback()])
        trainer.remove_callback(PrinterCallback)  # the progress bar shows the loss; no raw dict dumps
        result = trainer.train()
        train_seconds = time.perf_counter() - started
        eval_metrics = trainer.evaluate()
        trainer.model.save_pretrained(staging, selected_adapters=["default"])  # not TRL's frozen "ref" copy
        tokenizer.save_pretrained(staging)
        shutil.rmtree(staging / "_trainer", ignore_errors=True)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    tokens = trainer.state.num_input_tokens_seen
    section = {
        "method": f"lora-{method}",
        "adapter_dir": ADAPTER_DIR,
        "data_hash": manifest["data"]["dataset_hash"],
        "base_model": manifest["base_model"],
        "parent_run": {k: v for k, v in parent.items() if k != "adapter_path"} if parent else None,
        "config": config.train.model_dump(mode="json"),
        "max_length": config.data.max_length,
        "precision": precision,
        "threads": threads,
        "parameters": {"trainable": trainable, "total": total},
        "metrics": {
            "train_loss": round(result.training_loss, 4),
            "validation_loss": round(eval_metrics["eval_loss"], 4),
            **{name: round(eval_metrics[key], 4) for key, name in PREFERENCE_METRICS.items() if key in eval_metrics},
            "steps": trainer.state.global_step,
            "tokens_seen": tokens,
            "tokens_per_second": round(tokens / train_seconds, 1),
        },
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    update_manifest(run_dir, "train", section)
    return section


def parent_run_record(run_dir: Path, manifest: dict, parent_run: Path | None) -> dict | None:
    """Lineage of the run whose adapter we continue from, after checking it shares our base model and template."""
    if parent_run is None:
        return None
    parent_dir = Path(parent_run)
    if parent_dir.resolve() == Path(run_dir).resolve():
        raise TunesmithError(f"train.preference.parent_run={parent_run} is this run itself; name an earlier run directory")
    parent = read_manifest(parent_dir)
    trained = parent.get("train")
    if not trained:
        raise TunesmithError(f"train.preference.parent_run={parent_run} has no trained adapter; run `tunesmith train {parent_run}` first")
    if parent["base_model"]["source"] != manifest["base_model"]["source"]:
        raise TunesmithError(
            f"train.preference.parent_run={parent_run} was trained on {parent['base_model']['source']}, this run on "
            f"{manifest['base_model']['source']}; set base_model to the parent's"
        )
    if parent["data"]["chat_template_sha"] != manifest["data"]["chat_template_sha"]:
        raise TunesmithError(f"train.preference.parent_run={parent_run} used a different chat template; prepare both with one base model")
    adapter_path = parent_dir / trained["adapter_dir"]
    if not (adapter_path / "adapter_config.json").is_file():
        raise TunesmithError(f"{adapter_path}: no adapter_config.json; re-train the parent run {parent_run}")
    return {"run_dir": str(parent_dir.resolve()), "name": parent.get("name"), "method": trained["method"],
            "data_hash": trained["data_hash"], "adapter_path": adapter_path}


def _trainer_arguments(config: RunConfig, precision: str, output_dir: Path, use_cpu: bool):
    from trl import DPOConfig, KTOConfig

    train = config.train
    config_cls = DPOConfig if train.method == "dpo" else KTOConfig
    return config_cls(
        output_dir=str(output_dir), per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs, max_steps=train.max_steps or -1, learning_rate=train.learning_rate,
        warmup_steps=train.warmup_ratio, weight_decay=train.weight_decay, lr_scheduler_type="linear",
        logging_steps=train.logging_steps, save_strategy="no", eval_strategy="no", report_to=[],
        bf16=precision == "bf16", use_cpu=use_cpu, seed=config.seed, data_seed=config.seed, disable_tqdm=True,
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
        # TRL turns checkpointing on by default; on small models it only costs time.
        gradient_checkpointing=getattr(train, "gradient_checkpointing", False),
        beta=train.preference.beta, max_length=config.data.max_length,
    )


def _trainer_class(method: str):
    from trl import DPOTrainer, KTOTrainer

    return DPOTrainer if method == "dpo" else KTOTrainer
