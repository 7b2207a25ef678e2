"""The models compared: the base, the run's adapter and adapters of other runs (its parent, a champion, candidates)
on one loaded base, fully fine-tuned runs beside it, and the base prompted with few-shot examples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.models import answering_as, attach_adapter, load_model
from tunesmith.registry.run import Run

BASE = "base"
FINE_TUNED = "fine-tuned"
CHAMPION = "champion"
PARENT = "parent"
PROMPT_BASELINE = "prompt-baseline"
REFERENCES = {"base": BASE, "champion": CHAMPION, "parent": PARENT}
"""Gate reference (`exact_match >= parent`) -> the contender label it names."""


@dataclass
class Contender:
    label: str
    adapter_name: str | None
    """PEFT adapter switched on for this contender; None is the base model with adapters off."""
    run_dir: Path | None = None
    model: object | None = None
    """Its own fully fine-tuned model; None when it answers through the shared model (base or an adapter)."""
    few_shot: bool = False
    """The base model answering with training examples as few-shot turns before each request."""


def load_contenders(run: Run, tokenizer, candidates: list[Path], compare_base: bool, champion: Path | None = None,
                    parent: Path | None = None, prompt_baseline: bool = False):
    """The shared model (base, with every adapter attached) and the contenders in report order (base first).

    Adapters share one copy of the base weights; a fully fine-tuned run brings its own model. `champion` is the run
    a promotion must beat, labelled `champion`; `parent` the run this one continued from, labelled `parent`.
    """
    shared = load_model(run.base_source)
    contenders = [Contender(BASE, None)] if compare_base else []
    if prompt_baseline:
        contenders.append(Contender(PROMPT_BASELINE, None, few_shot=True))
    runs = [(FINE_TUNED, run)]
    for label, directory in ((PARENT, parent), (CHAMPION, champion)):
        if directory is not None:
            runs.append((label, Run.open(directory)))
            check_comparable(runs[-1][1], run, tokenizer)
    taken = {c.label for c in contenders} | {label for label, _ in runs}
    for candidate in candidates:
        other = Run.open(candidate)
        check_comparable(other, run, tokenizer)
        label = other.name or Path(candidate).name
        while label in taken:
            label += "'"
        taken.add(label)
        runs.append((label, other))
    for number, (label, contender_run) in enumerate(runs):
        if number:  # the evaluated run itself was verified before its tokenizer was loaded
            contender_run.verify_weights()
        weights = contender_run.weights_dir
        if contender_run.is_full_fine_tune:
            contenders.append(Contender(label, None, contender_run.directory, model=load_model(weights)))
            continue
        name = "adapter" if number == 0 else f"candidate_{number - 1}"
        shared = attach_adapter(shared, weights, name)
        contenders.append(Contender(label, name, contender_run.directory))
    shared.eval()
    return shared, contenders


def parent_dir(run: Run, champion: Path | None = None) -> Path | None:
    """The run directory this run continued from (`train.init_from`), unless it is the champion already evaluated."""
    recorded = run.trained.parent
    if recorded is None:
        return None
    directory = Path(recorded.run_dir)
    if champion is not None and directory.resolve() == Path(champion).resolve():
        return None
    if not directory.is_dir():
        raise TunesmithError(f"{run.directory} continued from {directory} (train.parent in its manifest), which is gone; "
                             "restore it to compare with it, or set evaluate.compare_parent=false")
    return directory


def reference_labels(results: dict, parent_is_champion: bool = False) -> dict[str, str]:
    """Gate references (`base`, `champion`, `parent`) -> the labels of the evaluated models they name."""
    labels = {name: label for name, label in REFERENCES.items() if label in results}
    if parent_is_champion and CHAMPION in results:
        labels["parent"] = CHAMPION
    return labels


def check_comparable(candidate: Run, run: Run, tokenizer) -> None:
    """A candidate must start from the run's base model and use its chat template."""
    if candidate.base_source != run.base_source:
        raise TunesmithError(f"candidate {candidate.directory} was trained on {candidate.base_source}, not on "
                             f"{run.base_source}; candidates must share the run's base model")
    candidate.check_template(tokenizer, whose=f"the run being evaluated ({run.directory}); compare runs made "
                                              "with one template")


def switched_to(model, contender: Contender):
    """The model answering as this contender: its own full model, the base with adapters off, or its adapter on."""
    return answering_as(model, contender.adapter_name, contender.model)
