"""Preference records in the row shapes TRL's DPO and KTO trainers take, and which data each accepts.

DPO rows are tokenized here, with the same template rules as SFT (an answer's trained tokens end with its
end-of-turn token, not the template's newline after it), because TRL would close every rejected reply with an end of
turn: for a reply cut right after its mistake (`rejected_cut`) that teaches "do not stop after the wrong word", which
the model never does anyway, and DPO meets its margin there instead of on the mistake."""

from __future__ import annotations

from tunesmith.data.template import end_of_turn_token_ids, generation_prompt_ids, tokenize_example
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


def dpo_token_rows(tokenizer, examples: list[PreferenceExample]) -> list[dict]:
    """`prompt_ids`/`chosen_ids`/`rejected_ids` per pair, as TRL's DPO collator takes them."""
    stops = set(end_of_turn_token_ids(tokenizer))
    rows = []
    for example in examples:
        prompt = [m.as_dict() for m in example.messages]
        rejected = _answer_ids(tokenizer, prompt, example.rejected)
        if example.rejected_cut:
            while rejected and rejected[-1] in stops:
                rejected.pop()
        rows.append({"prompt_ids": generation_prompt_ids(tokenizer, prompt),
                     "chosen_ids": _answer_ids(tokenizer, prompt, example.chosen), "rejected_ids": rejected})
    return rows


def _answer_ids(tokenizer, prompt: list[dict], answer: str) -> list[int]:
    """The answer's tokens and its end-of-turn token, as SFT trains them after `prompt`."""
    return tokenize_example(tokenizer, [*prompt, {"role": "assistant", "content": answer}], max_length=1 << 30).trained_ids
