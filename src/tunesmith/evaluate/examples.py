"""The held-out examples a run is evaluated on, as chat examples whose last turn is the reference answer."""

from __future__ import annotations

from pathlib import Path

from tunesmith.data.prepare import read_preference_split, read_split
from tunesmith.errors import TunesmithError
from tunesmith.registry.run import Run
from tunesmith.types import ChatExample, ChatMessage, PreferenceExample


def evaluation_examples(run: Run, test_file: str | None = None) -> list[ChatExample]:
    """SFT runs: the validation split. Preference runs: each prompt with its preferred (or desirable) reply.
    `test_file` (`evaluate.test_file`): a chat file instead, or `parent` for the parent run's validation split."""
    if test_file == "parent":
        parent = run.trained.parent if run.is_trained else None
        if parent is None:
            raise TunesmithError(f"evaluate.test_file is `parent`, but {run.directory} did not continue from another "
                                 "run (train.init_from); set train.init_from, or evaluate.test_file=null to evaluate "
                                 "on its own validation split")
        return evaluation_examples(Run.open(parent.run_dir))
    if test_file:
        return _test_examples(Path(test_file))
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


def _test_examples(path: Path) -> list[ChatExample]:
    from tunesmith.data.formats import read_examples

    if not path.is_file():
        raise TunesmithError(f"evaluate.test_file {path} does not exist; give a chat JSONL file of held-out examples "
                             "(or `parent`)")
    examples = read_examples(path)
    if not all(isinstance(e, ChatExample) and e.messages[-1].role == "assistant" for e in examples):
        raise TunesmithError(f"evaluate.test_file {path}: every example needs a reference answer (chat, "
                             "prompt/completion or alpaca rows), not preference pairs")
    return examples
