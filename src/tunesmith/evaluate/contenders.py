"""The models compared: the base, the run's adapter and adapters of other runs on one loaded base, and fully
fine-tuned runs beside it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.models import answering_as, attach_adapter, load_model
from tunesmith.registry.run import Run

BASE = "base"
FINE_TUNED = "fine-tuned"
CHAMPION = "champion"


@dataclass
class Contender:
    label: str
    adapter_name: str | None
    """PEFT adapter switched on for this contender; None is the base model with adapters off."""
    run_dir: Path | None = None
    model: object | None = None
    """Its own fully fine-tuned model; None when it answers through the shared model (base or an adapter)."""


def load_contenders(run: Run, tokenizer, candidates: list[Path], compare_base: bool, champion: Path | None = None):
    """The shared model (base, with every adapter attached) and the contenders in report order (base first).

    Adapters share one copy of the base weights; a fully fine-tuned run brings its own model. `champion` is the run
    a promotion must beat, labelled `champion`.
    """
    shared = load_model(run.base_source)
    contenders = [Contender(BASE, None)] if compare_base else []
    runs = [(FINE_TUNED, run)]
    if champion is not None:
        runs.append((CHAMPION, Run.open(champion)))
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
