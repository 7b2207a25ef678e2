"""What every training method records the same way: the manifest's `train` section, lineage, the weights' hash."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import TrainConfig
from tunesmith.registry.hashing import folder_sha256
from tunesmith.registry.run import Run

ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"


def parent_of(run: Run, settings: TrainConfig) -> Run | None:
    """The earlier run this one continues from (`train.init_from`), checked to share the base and kind of weights."""
    if settings.init_from is None:
        return None
    parent = Run.open(settings.init_from)
    parent.check_continuable_by(run, settings.adapter == "full")
    parent.verify_weights()  # training continues from these files: they must be the ones the parent trained
    return parent


def weights_source(run: Run, parent: Run | None, settings: TrainConfig) -> tuple[str | Path, Path | None]:
    """What training starts from: the model to load (the base, or a fully fine-tuned parent) and a parent's adapter."""
    if parent is None:
        return run.base_source, None
    if settings.adapter == "full":
        return parent.weights_dir, None
    return run.base_source, parent.weights_dir


def train_section(config, settings, run: Run, parent: Run | None, precision: str, threads: int,
                  parameters: tuple[int, int]) -> dict:
    """Method, where the weights go, lineage (parent run, data hash, base model), settings and machine setup."""
    full = settings.adapter == "full"
    trainable, total = parameters
    return {
        "method": f"{settings.adapter}-{settings.method}",
        "adapter": settings.adapter,
        "adapter_dir": None if full else ADAPTER_DIR,
        "model_dir": FULL_MODEL_DIR if full else None,
        "parent": parent and parent.as_parent().model_dump(exclude_none=True),
        "data_hash": run.manifest.data.dataset_hash,
        "base_model": run.manifest.base_model.model_dump(),
        "config": settings.model_dump(mode="json"),
        "max_length": config.data.max_length,
        "precision": precision,
        "threads": threads,
        "parameters": {"trainable": trainable, "total": total},
    }


def record_trained(run: Run, section: dict) -> dict:
    """Hash the saved weights into the section (registration checks it) and record it in the manifest."""
    section["weights_sha256"] = folder_sha256(run.directory / (section["adapter_dir"] or section["model_dir"]))
    run.record("train", section)
    return section
