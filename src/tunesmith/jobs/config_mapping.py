"""An OpenAI fine-tuning job's settings as the tunesmith RunConfig that trains it.

| OpenAI (JobSpec)                           | tunesmith RunConfig                                                  |
|--------------------------------------------|----------------------------------------------------------------------|
| base_model                                 | base_model                                                           |
| training_file                              | data.train, read as `chat` (supervised) or `openai_dpo` (dpo)        |
| validation_file                            | data.validation; none: data.validation_fraction of the pool held out |
| hyperparameters.n_epochs                   | train.epochs ("auto": tunesmith's default)                           |
| hyperparameters.batch_size                 | train.batch_size ("auto": tunesmith's default)                       |
| hyperparameters.learning_rate_multiplier   | train.learning_rate = multiplier x the rate tunesmith picks for this |
|                                            | base, adapter and method ("auto": unset, i.e. x 1)                   |
| method dpo, hyperparameters.beta           | train.method=dpo, train.preference.beta ("auto": tunesmith's 0.1)    |
| seed                                       | seed (none: derived from the job id, so a resumed job keeps it)      |
| the job folder                             | output_dir (the run is `<job folder>/run`)                           |

Fixed for every job: a LoRA adapter, strict data checks, only exact duplicates dropped (a client's rows are
trained as sent), the training loss logged every step (the job's metrics events), a checkpoint at the end of each
epoch (`with_epoch_checkpoints`, once the training split's size is known), and an evaluation light enough for a
CPU: up to 50 held-out examples, 64 new tokens each, no general-knowledge forgetting check.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from tunesmith.config import DataConfig, EvaluateConfig, PreferenceConfig, RunConfig, TrainConfig
from tunesmith.jobs.job_folder import RUN_DIR, JobFailed
from tunesmith.jobs.records import JobSpec

# OpenAI's accepted ranges (inclusive): what a client may ask for.
HYPERPARAMETER_RANGES = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (1e-3, 10.0),
                         "beta": (1e-3, 2.0)}
DATA_FORMAT = {"supervised": "chat", "dpo": "openai_dpo"}
JOB_EVALUATION = EvaluateConfig(max_examples=50, max_new_tokens=64, general_check=False, bootstrap_samples=1000)


def run_config_for(spec: JobSpec, job_dir: Path, training_file: Path | None = None,
                   validation_file: Path | None = None) -> RunConfig:
    """The run config of a job (mapping in this module's docstring); a bad hyperparameter is `invalid_hyperparameters`.

    `training_file` / `validation_file`: where the runner staged the uploads (default: the spec's paths)."""
    check_hyperparameters(spec)
    chosen = spec.hyperparameters
    train = TrainConfig(method="dpo" if spec.method == "dpo" else "sft", adapter="lora", logging_steps=1)
    if chosen.n_epochs != "auto":
        train.epochs = float(chosen.n_epochs)
    if chosen.batch_size != "auto":
        train.batch_size = chosen.batch_size
    if chosen.learning_rate_multiplier != "auto":
        train.learning_rate = chosen.learning_rate_multiplier * _default_learning_rate(spec.base_model, train.method)
    if chosen.beta != "auto":
        train.preference = PreferenceConfig(beta=chosen.beta)
    validation = validation_file or (Path(spec.validation_file) if spec.validation_file else None)
    data = DataConfig(train=training_file or Path(spec.training_file), validation=validation,
                      format=DATA_FORMAT[spec.method], mode="strict", dedup="exact")
    return RunConfig(name=RUN_DIR, base_model=spec.base_model, output_dir=Path(job_dir), seed=job_seed(spec),
                     data=data, train=train, evaluate=JOB_EVALUATION.model_copy(deep=True))


def with_epoch_checkpoints(config: RunConfig, train_rows: int) -> RunConfig:
    """`config` checkpointing at the end of every epoch of a training split of `train_rows` examples."""
    train = config.train
    steps_per_epoch = max(1, math.ceil(train_rows / (train.batch_size * train.grad_accum)))
    return config.model_copy(update={"train": train.model_copy(update={"checkpoint_steps": steps_per_epoch})})


def check_hyperparameters(spec: JobSpec) -> None:
    """Every hyperparameter a client set is in OpenAI's range and fits the method."""
    chosen = spec.hyperparameters
    for name, (low, high) in HYPERPARAMETER_RANGES.items():
        value = getattr(chosen, name)
        if value != "auto" and not low <= value <= high:
            raise JobFailed("invalid_hyperparameters", f"hyperparameters.{name}={value} is out of range; use a value "
                            f"from {low} to {high}, or \"auto\"", f"hyperparameters.{name}")
    if chosen.beta != "auto" and spec.method != "dpo":
        raise JobFailed("invalid_hyperparameters", "hyperparameters.beta applies to the dpo method only; remove it "
                        "or use method dpo", "hyperparameters.beta")


def job_seed(spec: JobSpec) -> int:
    """The client's seed, else one derived from the job id (a resumed job must draw the same one)."""
    if spec.seed is not None:
        return spec.seed
    return int(hashlib.sha256(spec.job_id.encode()).hexdigest()[:8], 16) % 2**31


def _default_learning_rate(base_model: str, method: str) -> float:
    from transformers import AutoConfig

    from tunesmith.models import resolve_base_model
    from tunesmith.train.learning_rate import default_learning_rate

    return default_learning_rate(AutoConfig.from_pretrained(str(resolve_base_model(base_model))), "lora", method)
