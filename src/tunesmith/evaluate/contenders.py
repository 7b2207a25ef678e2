"""The models compared: the base, the run's adapter, and adapters of other runs on the same base, in one loaded model."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunesmith.data.template import template_fingerprint
from tunesmith.errors import TunesmithError
from tunesmith.models import load_with_adapter
from tunesmith.registry.run_dir import read_manifest

BASE = "base"
FINE_TUNED = "fine-tuned"


@dataclass
class Contender:
    label: str
    adapter_name: str | None
    """PEFT adapter switched on for this contender; None is the base model with adapters off."""
    run_dir: Path | None = None


def trained_adapter_dir(run_dir: Path, manifest: dict) -> Path:
    if "train" not in manifest:
        raise TunesmithError(f"{run_dir} has no trained adapter yet; run `tunesmith train {run_dir}` first")
    if not manifest["train"].get("adapter_dir"):
        raise TunesmithError(f"{run_dir} was fully fine-tuned (no adapter); evaluating full fine-tunes is not supported yet")
    return Path(run_dir) / manifest["train"]["adapter_dir"]


def load_contenders(run_dir: Path, manifest: dict, tokenizer, candidates: list[Path], compare_base: bool):
    """One model holding every adapter, and the contenders in report order (base first)."""
    model = load_with_adapter(manifest["base_model"]["source"], trained_adapter_dir(run_dir, manifest))
    contenders = [Contender(BASE, None)] if compare_base else []
    contenders.append(Contender(FINE_TUNED, "adapter", Path(run_dir)))
    taken = {c.label for c in contenders}
    for number, candidate in enumerate(candidates):
        other = read_manifest(candidate)
        if other["base_model"]["source"] != manifest["base_model"]["source"]:
            raise TunesmithError(f"candidate {candidate} was trained on {other['base_model']['source']}, not on "
                                 f"{manifest['base_model']['source']}; candidates must share the run's base model")
        if other.get("data", {}).get("chat_template_sha") != template_fingerprint(tokenizer):
            raise TunesmithError(f"candidate {candidate} used a different chat template; it cannot be compared fairly")
        label = other.get("name") or Path(candidate).name
        while label in taken:
            label += "'"
        taken.add(label)
        name = f"candidate_{number}"
        model.load_adapter(str(trained_adapter_dir(candidate, other)), adapter_name=name)
        contenders.append(Contender(label, name, Path(candidate)))
    model.eval()
    return model, contenders


@contextmanager
def switched_to(model, contender: Contender):
    """The shared model answering as this contender: adapters off for the base, else its adapter on."""
    if contender.adapter_name is None:
        with model.disable_adapter():
            yield model
        return
    model.set_adapter(contender.adapter_name)
    yield model
