"""The held-out examples a run is evaluated on, as chat examples whose last turn is the reference answer."""

from __future__ import annotations

from tunesmith.data.prepare import read_preference_split, read_split
from tunesmith.registry.run import Run
from tunesmith.types import ChatExample, ChatMessage, PreferenceExample


def evaluation_examples(run: Run) -> list[ChatExample]:
    """SFT runs: the validation split. Preference runs: each prompt with its preferred (or desirable) reply."""
    run_dir = run.directory
    if run.data_kind == "sft":
        return read_split(run_dir, "validation")
    examples = []
    for record in read_preference_split(run_dir, "validation"):
        reply = record.chosen if isinstance(record, PreferenceExample) else (record.completion if record.label else None)
        if reply is not None:
            examples.append(ChatExample(messages=[*record.messages, ChatMessage(role="assistant", content=reply)],
                                        source_line=record.source_line))
    return examples
