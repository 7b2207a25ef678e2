"""Preference splits from the run directory, in the conversational row shapes TRL's DPO/KTO trainers take."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from tunesmith.errors import TunesmithError
from tunesmith.types import PreferenceExample, UnpairedPreferenceExample

PAIRED, UNPAIRED = "preference", "unpaired_preference"
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl"}
# Which data kinds each preference method can learn from (KTO unpairs pairs itself).
ACCEPTED_KINDS = {"dpo": (PAIRED,), "kto": (PAIRED, UNPAIRED)}


def preference_kind(run_dir: Path, manifest: dict, method: str) -> str:
    """The run's data kind, checked against what `method` can train on."""
    kind = manifest["data"].get("kind", "sft")
    accepted = ACCEPTED_KINDS[method]
    if kind not in accepted:
        raise TunesmithError(
            f"{run_dir}: train.method={method} needs {' or '.join(accepted)} data, but this run was prepared from "
            f"{kind} data; prepare a file of {{messages, chosen, rejected}} rows, or use train.method=sft"
        )
    return kind


def read_preference_rows(run_dir: Path, split: str, kind: str) -> list[PreferenceExample | UnpairedPreferenceExample]:
    """Validated records of one split; a bad line is reported with its file and line number."""
    record = PreferenceExample if kind == PAIRED else UnpairedPreferenceExample
    path = Path(run_dir) / "data" / SPLIT_FILES[split]
    if not path.is_file():
        raise TunesmithError(f"{path} not found; run `tunesmith prepare CONFIG` first")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                rows.append(_parse(record, line, f"{path}:{number}"))
    if not rows:
        raise TunesmithError(f"{path}: no examples; add rows to the data and prepare again")
    return rows


def trl_rows(examples: list[PreferenceExample | UnpairedPreferenceExample]) -> list[dict]:
    """Conversational rows: `prompt` turns plus `chosen`/`rejected` (or `completion`/`label`) assistant turns."""
    rows = []
    for example in examples:
        row = {"prompt": [m.model_dump() for m in example.messages]}
        if isinstance(example, PreferenceExample):
            row["chosen"] = [{"role": "assistant", "content": example.chosen}]
            row["rejected"] = [{"role": "assistant", "content": example.rejected}]
        else:
            row["completion"] = [{"role": "assistant", "content": example.completion}]
            row["label"] = example.label
        rows.append(row)
    return rows


def _parse(record: type[BaseModel], line: str, where: str):
    try:
        example = record.model_validate(json.loads(line))
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{where}: not valid JSON ({exc.msg}); re-run `tunesmith prepare`") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "row"
        raise TunesmithError(f"{where}: {key}: {err['msg']}; each row needs {_fields(record)}") from None
    if not example.messages or example.messages[-1].role != "user":
        raise TunesmithError(f"{where}: the prompt `messages` must end with a user turn (the reply is in chosen/rejected)")
    return example


def _fields(record: type[BaseModel]) -> str:
    return ", ".join(name for name in record.model_fields if name != "source_line")
