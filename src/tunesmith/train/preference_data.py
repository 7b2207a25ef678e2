"""Preference records in the conversational row shapes TRL's DPO and KTO trainers take, and which data each accepts."""

from __future__ import annotations

from tunesmith.errors import TunesmithError
from tunesmith.registry.run import Run
from tunesmith.types import PreferenceExample, UnpairedPreferenceExample

PAIRED, UNPAIRED = "preference", "unpaired_preference"
# Which data kinds each preference method can learn from (KTO unpairs pairs itself).
ACCEPTED_KINDS = {"dpo": (PAIRED,), "kto": (PAIRED, UNPAIRED)}


def check_preference_kind(run: Run, method: str) -> str:
    """The run's data kind, checked against what `method` can train on."""
    kind = run.data_kind
    accepted = ACCEPTED_KINDS[method]
    if kind not in accepted:
        raise TunesmithError(
            f"{run.directory}: train.method={method} needs {' or '.join(accepted)} data, but this run was prepared from "
            f"{kind} data; prepare prompt/chosen/rejected rows (TRL or OpenAI DPO format), or use train.method=sft"
        )
    return kind


def trl_rows(examples: list[PreferenceExample] | list[UnpairedPreferenceExample]) -> list[dict]:
    """Conversational rows: `prompt` turns plus `chosen`/`rejected` (or `completion`/`label`) assistant turns."""
    rows = []
    for example in examples:
        row = {"prompt": [m.as_dict() for m in example.messages]}
        if isinstance(example, PreferenceExample):
            row["chosen"] = [{"role": "assistant", "content": example.chosen}]
            row["rejected"] = [{"role": "assistant", "content": example.rejected}]
        else:
            row["completion"] = [{"role": "assistant", "content": example.completion}]
            row["label"] = example.label
        rows.append(row)
    return rows
