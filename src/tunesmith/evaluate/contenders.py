"""The models compared: the base, the run's adapter and adapters of other runs on one loaded base, and fully
fine-tuned runs beside it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.data.template import template_fingerprint
from tunesmith.errors import TunesmithError
from tunesmith.models import answering_as, load_model
from tunesmith.registry.run_dir import is_full_fine_tune, read_manifest, trained_weights_dir

BASE = "base"
FINE_TUNED = "fine-tuned"


@dataclass
class Contender:
    label: str
    adapter_name: str | None
    """PEFT adapter switched on for this contender; None is the base model with adapters off."""
    run_dir: Path | None = None
    model: object | None = None
    """Its own fully fine-tuned model; None when it answers through the shared model (base or an adapter)."""


def load_contenders(run_dir: Path, manifest: dict, tokenizer, candidates: list[Path], compare_base: bool):
    """The shared model (base, with every adapter attached) and the contenders in report order (base first).

    Adapters share one copy of the base weights; a fully fine-tuned run brings its own model.
    """
    shared = load_model(manifest["base_model"]["source"])
    contenders = [Contender(BASE, None)] if compare_base else []
    runs = [(FINE_TUNED, Path(run_dir), manifest)]
    taken = {c.label for c in contenders} | {FINE_TUNED}
    for candidate in candidates:
        other = read_manifest(candidate)
        check_comparable(candidate, other, manifest, tokenizer)
        label = other.get("name") or Path(candidate).name
        while label in taken:
            label += "'"
        taken.add(label)
        runs.append((label, Path(candidate), other))
    for number, (label, directory, run_manifest) in enumerate(runs):
        weights = trained_weights_dir(directory, run_manifest)
        if is_full_fine_tune(run_manifest):
            contenders.append(Contender(label, None, directory, model=load_model(weights)))
            continue
        name = "adapter" if number == 0 else f"candidate_{number - 1}"
        shared = _attach_adapter(shared, weights, name)
        contenders.append(Contender(label, name, directory))
    shared.eval()
    return shared, contenders


def check_comparable(candidate: Path, other: dict, manifest: dict, tokenizer) -> None:
    """A candidate must start from the run's base model and use its chat template."""
    if other["base_model"]["source"] != manifest["base_model"]["source"]:
        raise TunesmithError(f"candidate {candidate} was trained on {other['base_model']['source']}, not on "
                             f"{manifest['base_model']['source']}; candidates must share the run's base model")
    if other.get("data", {}).get("chat_template_sha") != template_fingerprint(tokenizer):
        raise TunesmithError(f"candidate {candidate} used a different chat template; it cannot be compared fairly")


def _attach_adapter(model, adapter_dir: Path, name: str):
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)


def switched_to(model, contender: Contender):
    """The model answering as this contender: its own full model, the base with adapters off, or its adapter on."""
    return answering_as(model, contender.adapter_name, contender.model)
