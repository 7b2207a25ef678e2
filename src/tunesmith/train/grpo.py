"""GRPO with verifiable rewards on TRL's GRPOTrainer, from the base model or an earlier run (`train.init_from`).

Each prompt of the run's SFT split is answered `train.grpo.num_generations` times; every answer is scored by the
rewards in `train.grpo.rewards` against the dataset's answer, and the policy moves toward the answers that beat their
group's mean. Read top to bottom: data -> rewards -> model (as SFT builds it) -> TRL trainer -> save -> manifest.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.prepare import read_split
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer
from tunesmith.registry.run import Run
from tunesmith.registry.run_dir import staged_dir
from tunesmith.train.checkpoints import resume_point, settings_of
from tunesmith.machine import pick_precision, set_cpu_threads
from tunesmith.train.loop import LoopProgress
from tunesmith.train.rewards import Reward, load_rewards
from tunesmith.train.run_record import ADAPTER_DIR, FULL_MODEL_DIR, parent_of, record_trained, train_section
from tunesmith.train.trl_footing import (RunFooting, footing_arguments, footing_section, train_with_footing,
                                         trl_training_model)

# Held-out prompts whose sampled answers are rewarded before and after training; sampling them is the cost.
VALIDATION_PROMPTS = 16


def train_grpo(run_dir: Path, config: RunConfig, resume: bool = False, restart: bool = False,
               on_step: Callable[[LoopProgress, int], None] | None = None) -> dict:
    """Train with GRPO on the run's SFT split; write `<run_dir>/adapter` (or `model`) and manifest `train` with the reward curve.

    Checkpoints of an earlier attempt are continued (`resume`, exactly) or deleted (`restart`), never dropped
    silently. `on_step(progress, total_steps)` is called after every optimizer step (a fine-tuning job reports)."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import GRPOTrainer

    run_dir, settings = Path(run_dir), config.train
    run = Run.open(run_dir)
    _check_chat_data(run)
    resumed_from = resume_point(run_dir, resume, restart)
    if resumed_from:
        settings = settings_of(resumed_from, settings)
    rewards = load_rewards(settings.grpo)
    _check_group_size(settings)
    tokenizer = load_tokenizer(run.base_source)
    run.check_template(tokenizer)
    parent = parent_of(run, settings)
    precision = pick_precision(settings.precision)
    threads = set_cpu_threads(settings.threads)
    set_seed(config.seed)
    train_set = Dataset.from_list(prompt_rows(run_dir, "train"))
    val_set = Dataset.from_list(prompt_rows(run_dir, "validation")[:VALIDATION_PROMPTS])

    # A parent's adapter is trained further; with beta > 0 TRL keeps a frozen copy of it as the reference policy.
    model, config, (trainable, total) = trl_training_model(run, parent, config, precision, resumed_from)
    settings = config.train
    started = time.perf_counter()
    target = run_dir / (FULL_MODEL_DIR if settings.adapter == "full" else ADAPTER_DIR)
    with staged_dir(target) as staging:
        args = _trainer_arguments(config, precision, staging / "_trainer", use_cpu=not torch.cuda.is_available())
        trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward_function(r) for r in rewards], args=args,
                              processing_class=tokenizer, train_dataset=train_set, eval_dataset=val_set)
        trainer.remove_callback(PrinterCallback)  # no raw metric dicts on the terminal
        # A resumed run's weights are loaded inside train(): before it, they are not the run's starting point.
        validation_before = None if resumed_from else validation_rewards(trainer)
        progress = train_with_footing(trainer, run_dir, settings, resumed_from, on_step)
        trainer.remove_callback(RunFooting)  # GRPO's loss on held-out answers is no validation loss to record
        validation_after = validation_rewards(trainer)
        save_kwargs = {} if settings.adapter == "full" else {"selected_adapters": ["default"]}  # not TRL's "ref" copy
        trainer.model.save_pretrained(staging, **save_kwargs)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(staging / "_trainer", ignore_errors=True)
    curve = reward_curve(trainer.state.log_history, [r.name for r in rewards])
    footing = footing_section(progress, run_dir, resumed_from)
    section = {
        **train_section(config, settings, run, parent, precision, threads, (trainable, total)),
        **footing,
        "processes": trainer.args.world_size,
        "metrics": {
            **reward_change(curve),
            "validation_reward_before": validation_before,
            "validation_reward_after": validation_after,
            **_progress_metrics(progress),
        },
        "reward_curve": curve,
        "warnings": footing["warnings"] + flat_reward_warnings(curve),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    return record_trained(run, section)


def _progress_metrics(progress: LoopProgress) -> dict:
    seconds = max(progress.train_seconds, 1e-9)
    return {
        "train_loss": round(progress.loss_curve[-1]["loss"], 4) if progress.loss_curve else None,
        "steps": progress.step,
        "tokens_seen": progress.tokens_seen,
        "tokens_per_second": round(progress.tokens_seen / seconds, 1),
        "train_seconds": round(progress.train_seconds, 1),
    }


def prompt_rows(run_dir: Path, split: str) -> list[dict]:
    """TRL conversational prompts: every turn before the last assistant turn, which becomes the `reference`."""
    return [{"prompt": example.prompt_messages(), "reference": example.reference()}
            for example in read_split(run_dir, split)]


def validation_rewards(trainer) -> float | None:
    """Mean weighted reward of answers sampled for the held-out prompts, as training samples them."""
    if not len(trainer.eval_dataset):
        return None
    metrics = trainer.evaluate()
    trainer.state.log_history.pop()  # evaluate() logged it as a step; the reward curve holds training steps only
    return round(metrics["eval_reward"], 4)


def trl_reward_function(reward: Reward):
    """`reward` in TRL's reward-function shape: a batch of completions (plus dataset columns) in, one float each out."""

    def score_batch(completions: list, reference: list[str], **_) -> list[float]:
        return [reward.score(_completion_text(c), r) for c, r in zip(completions, reference, strict=True)]

    score_batch.__name__ = reward.name  # TRL logs each reward as rewards/<name>/mean
    return score_batch


def _completion_text(completion) -> str:
    # Conversational prompts get the answer as a one-message list; plain-text prompts as a string.
    return completion if isinstance(completion, str) else completion[-1]["content"]


# TRL's logged GRPO statistics -> the reward curve's names for them.
CURVE_STATISTICS = {
    "reward_std": "reward_std",
    "frac_reward_zero_std": "flat_groups",  # share of prompts whose answers all scored the same: nothing to learn
    "completions/mean_length": "answer_tokens",
    "completions/clipped_ratio": "clipped",  # share of answers cut at max_completion_length
}


def reward_curve(log_history: list[dict], names: list[str]) -> list[dict]:
    """Per logged step (means over the steps since the last): the weighted reward, each reward, answer statistics."""
    return [{"step": h["step"], "reward": round(h["reward"], 4),
             **{name: round(h[f"rewards/{name}/mean"], 4) for name in names if f"rewards/{name}/mean" in h},
             **{ours: round(h[theirs], 4) for theirs, ours in CURVE_STATISTICS.items() if theirs in h}}
            for h in log_history if "reward" in h]


def flat_reward_warnings(curve: list[dict]) -> list[str]:
    """A warning when no group of answers ever differed in reward: GRPO then has no signal and the weights stay put."""
    if curve and all(point.get("flat_groups") == 1.0 for point in curve):
        return ["every prompt's answers scored the same at every step, so GRPO had nothing to learn from; "
                "pick rewards the model sometimes earns (field_match is denser than exact_match), raise "
                "train.grpo.temperature or num_generations, or start from an SFT run (train.init_from)"]
    return []


def reward_change(curve: list[dict]) -> dict:
    """The mean reward of the first and last logged steps (the run's before and after)."""
    if not curve:
        return {}
    before, after = curve[0]["reward"], curve[-1]["reward"]
    return {"reward_before": before, "reward_after": after, "reward_gain": round(after - before, 4)}


def _check_chat_data(run: Run) -> None:
    if run.data_kind != "sft":
        raise TunesmithError(f"{run.directory}: train.method=grpo samples answers to chat prompts, but this run was "
                             f"prepared from {run.data_kind} data; prepare chat (messages) rows, or use "
                             "train.method=dpo / kto for preference pairs")


def _check_group_size(settings) -> None:
    # TRL scores answers in groups of num_generations; a step must hold whole groups.
    completions, group = settings.batch_size * settings.grad_accum, settings.grpo.num_generations
    if completions % group:
        raise TunesmithError(f"train.batch_size x train.grad_accum = {completions} answers per step is not a multiple "
                             f"of train.grpo.num_generations={group}; set train.batch_size to a multiple of {group}")


def _trainer_arguments(config: RunConfig, precision: str, output_dir: Path, use_cpu: bool):
    from trl import GRPOConfig

    train, grpo = config.train, config.train.grpo
    return GRPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum, num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1, learning_rate=train.learning_rate, warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        lr_scheduler_type="constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler,
        max_grad_norm=train.max_grad_norm or 0.0, bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=use_cpu, seed=config.seed, data_seed=config.seed, dataloader_num_workers=0,
        # No periodic validation: it would sample answers (slow) to report GRPO's loss, which is no quality measure.
        **footing_arguments(train, validates=False),
        # build_training_model already applied train.gradient_checkpointing; TRL would turn it on by default.
        gradient_checkpointing=False,
        num_generations=grpo.num_generations, max_completion_length=grpo.max_completion_length,
        per_device_eval_batch_size=grpo.num_generations * max(1, train.batch_size // grpo.num_generations),
        temperature=grpo.temperature, beta=grpo.beta, reward_weights=grpo.reward_weights,
        # Training turned the model's KV cache off; without it every sampled token recomputes the whole answer so far.
        generation_kwargs={"use_cache": True},
    )
