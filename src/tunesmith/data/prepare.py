"""Data stage entry point: read, validate, split, tokenize-check, and write the run directory's data."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunesmith.config import RunConfig, config_to_yaml
from tunesmith.data.formats import read_examples
from tunesmith.data.split import content_hash, dataset_hash, split_by_content_hash
from tunesmith.data.template import IGNORE_INDEX, template_fingerprint, tokenize_example
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer, resolve_base_model
from tunesmith.registry.run_dir import MANIFEST, environment, staged_dir, write_json_atomic
from tunesmith.types import ChatExample

TRAIN_FILE, VALIDATION_FILE = "train.jsonl", "validation.jsonl"


def prepare(config: RunConfig, overwrite: bool = False) -> Path:
    """Write `<run_dir>/{config.yaml, data/, manifest.json}`; the run dir appears only when complete."""
    started = time.perf_counter()
    run_dir = config.run_dir
    if (run_dir / MANIFEST).exists() and not overwrite:
        raise TunesmithError(f"{run_dir} already holds a run; pass --overwrite or choose another name (name=...)")
    train, validation = load_splits(config)
    base_source = resolve_base_model(config.base_model)
    tokenizer = load_tokenizer(base_source)
    stats = {split: token_stats(tokenizer, rows, config.data.max_length)
             for split, rows in (("train", train), ("validation", validation))}
    data_section = {
        "train_file": f"data/{TRAIN_FILE}",
        "validation_file": f"data/{VALIDATION_FILE}",
        "source": {"train": str(config.data.train), "validation": str(config.data.validation or "")},
        "rows": {"train": len(train), "validation": len(validation)},
        "dataset_hash": dataset_hash(train + validation),
        "train_hash": dataset_hash(train),
        "validation_hash": dataset_hash(validation),
        "tokens": stats,
        "chat_template_sha": template_fingerprint(tokenizer),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    with staged_dir(run_dir) as staging:
        (staging / "data").mkdir()
        write_jsonl(staging / "data" / TRAIN_FILE, train)
        write_jsonl(staging / "data" / VALIDATION_FILE, validation)
        (staging / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")
        manifest = {"name": config.name, "base_model": {"name": config.base_model, "source": str(base_source)},
                    "data": data_section, "environment": environment()}
        write_json_atomic(staging / MANIFEST, manifest)
    return run_dir


def load_splits(config: RunConfig) -> tuple[list[ChatExample], list[ChatExample]]:
    """Training and validation examples, either from two files or split by content hash."""
    data = config.data
    rows = read_examples(data.train, data.format, data.system_prompt)
    if data.validation:
        validation = read_examples(data.validation, data.format, data.system_prompt)
        held_out = {content_hash(e) for e in validation}
        train = [e for e in rows if content_hash(e) not in held_out]
    else:
        if not 0 < data.validation_fraction < 1:
            raise TunesmithError("data.validation_fraction must be between 0 and 1 (or give data.validation)")
        train, validation = split_by_content_hash(rows, data.validation_fraction, config.seed)
    if not train or not validation:
        raise TunesmithError(f"{data.train}: too few examples to split ({len(rows)}); add rows or a validation file")
    return train, validation


def token_stats(tokenizer, examples: list[ChatExample], max_length: int) -> dict:
    """Token counts through the chat template: total, trained (assistant) share, truncated examples."""
    total = trained = truncated = longest = 0
    for example in examples:
        full = tokenize_example(tokenizer, [m.model_dump() for m in example.messages], max_length=10**9)
        total += len(full.input_ids)
        longest = max(longest, len(full.input_ids))
        truncated += len(full.input_ids) > max_length
        trained += sum(1 for label in full.labels[:max_length] if label != IGNORE_INDEX)
    return {"total": total, "trained": trained, "trained_share": round(trained / max(total, 1), 4),
            "longest": longest, "truncated_examples": truncated}


def write_jsonl(path: Path, examples: list[ChatExample]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"messages": [m.model_dump() for m in example.messages]}, ensure_ascii=False) + "\n")


def read_split(run_dir: Path, split: str) -> list[ChatExample]:
    """Examples a previous prepare wrote into the run directory."""
    name = TRAIN_FILE if split == "train" else VALIDATION_FILE
    return read_examples(Path(run_dir) / "data" / name, "chat")
