"""The part of a run manifest's `train` section that every training method writes the same way."""

from __future__ import annotations

ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"


def train_section(config, settings, manifest: dict, parent: dict | None, precision: str, threads: int,
                  parameters: tuple[int, int]) -> dict:
    """Method, where the weights go, lineage (parent run, data hash, base model), settings and machine setup."""
    full = settings.adapter == "full"
    trainable, total = parameters
    return {
        "method": f"{settings.adapter}-{settings.method}",
        "adapter": settings.adapter,
        "adapter_dir": None if full else ADAPTER_DIR,
        "model_dir": FULL_MODEL_DIR if full else None,
        "parent": parent and {k: v for k, v in parent.items() if not k.endswith("_path")},
        "data_hash": manifest["data"]["dataset_hash"],
        "base_model": manifest["base_model"],
        "config": settings.model_dump(mode="json"),
        "max_length": config.data.max_length,
        "precision": precision,
        "threads": threads,
        "parameters": {"trainable": trainable, "total": total},
    }
