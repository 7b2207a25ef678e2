"""Data stage entry point: check, clean, dedup, split, count tokens, write the card and the run directory's data."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

from tunesmith.config import RunConfig, config_to_yaml
from tunesmith.data.card import TokenStats, card_html, card_markdown
from tunesmith.data.formats import read_examples
from tunesmith.data.pipeline import Source, run_pipeline, write_splits
from tunesmith.progress_display import LoggedProgress
from tunesmith.data.readers import lone_surrogate, safe_text
from tunesmith.data.rows import RowSettings
from tunesmith.data.run_lock import run_lock
from tunesmith.data.template import template_fingerprint
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer, resolve_base_model
from tunesmith.records import MANIFEST_VERSION, BaseModelRef, Manifest
from tunesmith.registry.run import write_manifest
from tunesmith.registry.run_dir import MANIFEST, environment, staged_dir, write_json_atomic
from tunesmith.types import ChatExample, PreferenceExample, UnpairedPreferenceExample

TRAIN_FILE, VALIDATION_FILE, DROPPED_FILE = "train.jsonl", "validation.jsonl", "dropped.jsonl"
CARD_MD, CARD_HTML = "card.md", "card.html"
RECORD_TYPES = {"preference": PreferenceExample, "unpaired_preference": UnpairedPreferenceExample}


def prepare(config: RunConfig, overwrite: bool = False) -> Path:
    """Write `<run_dir>/{config.yaml, data/, manifest.json}`; the run dir appears only when complete.

    One prepare per run name at a time: a second one is refused while the first holds the run's lock."""
    with run_lock(config.run_dir):
        return _prepare_locked(config, overwrite)


def _prepare_locked(config: RunConfig, overwrite: bool) -> Path:
    started = time.perf_counter()
    check_names_are_text(config)
    run_dir = config.run_dir
    if (run_dir / MANIFEST).exists() and not overwrite:
        raise TunesmithError(f"{run_dir} already holds a run; pass --overwrite or choose another name (name=...)")
    base_source = resolve_base_model(config.base_model)
    tokenizer = load_tokenizer(base_source)
    with staged_dir(run_dir) as staging:
        data_dir = staging / "data"
        data_dir.mkdir()
        data_section = prepare_data(config, tokenizer, data_dir)
        replay = _replay(config, base_source, tokenizer, data_section, data_dir)
        if replay:
            data_section["replay"] = replay
        data_section["wall_time_s"] = round(time.perf_counter() - started, 2)
        (staging / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")
        write_manifest(staging / MANIFEST, Manifest(
            version=MANIFEST_VERSION, name=config.name, data=data_section, environment=environment(),
            base_model=BaseModelRef(name=config.base_model, source=str(base_source))))
        (data_dir / CARD_MD).write_text(card_markdown(data_section, config.name), encoding="utf-8")
        (data_dir / CARD_HTML).write_text(card_html(card_markdown(data_section, config.name), data_section), encoding="utf-8")
        if data_section["kind"] == "sft":
            from tunesmith.data.preflight import preflight_report, raise_on_failures

            report = preflight_report(staging, config, tokenizer, data_section, from_prepare=True)
            write_json_atomic(data_dir / "preflight.json", report)
            raise_on_failures(report)
    return run_dir


def _replay(config: RunConfig, base_source, tokenizer, data_section: dict, data_dir: Path) -> dict | None:
    if not config.data.replay.share or data_section["kind"] != "sft":
        return None  # preference data keeps its base through the reference model instead
    from tunesmith.data.replay import write_replay

    return write_replay(config, base_source, tokenizer, data_section["rows"]["train"], data_dir)


def check_names_are_text(config: RunConfig) -> None:
    """Names recorded in the manifest and config.yaml must be text: a file name whose bytes are not UTF-8 is not."""
    data = config.data
    named = [("name", config.name), ("output_dir", config.output_dir), ("data.train", data.train),
             ("data.validation", data.validation)] + [(f"data.sources[{n}].path", s.path) for n, s in enumerate(data.sources)]
    for key, value in named:
        bad = lone_surrogate(str(value)) if value else None
        if bad:
            raise TunesmithError(f"{key}: {safe_text(str(value))} is not valid UTF-8 text (it holds {bad}); rename the "
                                 "file or folder to a UTF-8 name")


def data_sources(config: RunConfig) -> list[Source]:
    data = config.data
    sources = [Source(Path(data.train))] + [Source(Path(s.path), s.weight) for s in data.sources]
    if any(s.weight <= 0 for s in sources):
        raise TunesmithError("data.sources[].weight must be above 0; remove a source to leave it out")
    if data.validation:
        sources.append(Source(Path(data.validation), held_out=True))
    elif not 0 < data.validation_fraction < 1:
        raise TunesmithError("data.validation_fraction must be between 0 and 1 (or give data.validation)")
    return sources


def prepare_data(config: RunConfig, tokenizer, data_dir: Path) -> dict:
    """Run the pipeline into `data_dir` and return the manifest's data section."""
    data = config.data
    sources = data_sources(config)
    settings = RowSettings(fmt=None if data.format == "auto" else data.format, system_prompt=data.system_prompt,
                           clean=data.clean, redact_pii=data.redact_pii, special_tokens=special_token_texts(tokenizer),
                           stratify_by=data.stratify_by, num_perm=data.minhash_permutations)
    scratch = data_dir / ".checked.jsonl"
    with LoggedProgress(SpinnerColumn(), TextColumn("[bold]data[/] {task.description}"), TextColumn("{task.completed:,} rows"),
                  TimeElapsedColumn(), transient=True) as progress:
        task = progress.add_task("checking, cleaning, dedup", total=None)
        result = run_pipeline(sources, settings, data, config.seed, scratch, data_dir / DROPPED_FILE,
                              progress=lambda: progress.advance(task))
        rows = {"train": int(result.copies.sum()), "validation": int(result.held_out.sum())}
        if not rows["train"] or not rows["validation"]:
            raise TunesmithError(f"{data.train}: too few examples to split ({rows}); add rows or a validation file")
        stats = TokenStats(tokenizer, result.kind, data.max_length, rows, data.token_stats_rows)
        split_hashes = {"train": [], "validation": []}

        def on_row(row: int, split: str, record: str) -> None:
            content = result.rows.content[row]
            split_hashes[split].append(content)
            if stats.wants(split, content):
                stats.add(split, json.loads(record), 1 if split == "validation" else int(result.copies[row]))
            progress.advance(task)

        progress.update(task, description="splitting, counting tokens", completed=0)
        write_splits(result, sources, scratch, data_dir / TRAIN_FILE, data_dir / VALIDATION_FILE,
                     data_dir / DROPPED_FILE, on_row)
    scratch.unlink()
    accounting = {"read": result.read, "kept": result.kept, "dropped": dict(result.dropped), "flagged": dict(result.flagged)}
    if accounting["read"] != accounting["kept"] + sum(accounting["dropped"].values()):
        raise AssertionError(f"row accounting does not add up: {accounting}")  # our bug, never the user's
    return {
        "kind": result.kind, "train_file": f"data/{TRAIN_FILE}", "validation_file": f"data/{VALIDATION_FILE}",
        "dropped_file": f"data/{DROPPED_FILE}", "card": f"data/{CARD_MD}",
        "source": {"train": str(data.train), "validation": str(data.validation or "")},
        "sources": [{"path": str(s.path), "format": result.formats[str(s.path)], "weight": s.weight,
                     "held_out": s.held_out} for s in sources],
        "rows": rows, "accounting": accounting,
        "dedup": {"mode": data.dedup, "threshold": data.near_duplicate_threshold, "clusters": result.clusters},
        "pii": {"enabled": data.redact_pii, "redacted": dict(result.pii)},
        "dataset_hash": hash_of_hashes(split_hashes["train"] + split_hashes["validation"]),
        "train_hash": hash_of_hashes(split_hashes["train"]),
        "validation_hash": hash_of_hashes(split_hashes["validation"]),
        "tokens": stats.summary(),
        "chat_template_sha": template_fingerprint(tokenizer),
    }


def special_token_texts(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special tokens as text; none may appear inside example content."""
    added = [token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special]
    return tuple(sorted(set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True))


def hash_of_hashes(content_hashes: list[str]) -> str:
    """Version of a dataset: the same content gives the same hash, whatever the row order or file names."""
    return hashlib.sha256("\n".join(sorted(content_hashes)).encode()).hexdigest()


def read_split(run_dir: Path, split: str) -> list[ChatExample]:
    """SFT examples a previous prepare wrote into the run directory."""
    name = TRAIN_FILE if split == "train" else VALIDATION_FILE
    return read_examples(Path(run_dir) / "data" / name, "chat")


def read_preference_split(run_dir: Path, split: str) -> list[PreferenceExample] | list[UnpairedPreferenceExample]:
    """Preference records (paired or unpaired, as the manifest's data.kind says) from a prepared run directory."""
    from tunesmith.registry.run import Run

    kind = Run.open(run_dir).data_kind
    if kind not in RECORD_TYPES:
        raise TunesmithError(f"{run_dir} holds {kind} data, not preference pairs; prepare it from preference data")
    path = Path(run_dir) / "data" / (TRAIN_FILE if split == "train" else VALIDATION_FILE)
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            record = RECORD_TYPES[kind].model_validate_json(line)
            record.source_line = line_no
            records.append(record)
    return records
