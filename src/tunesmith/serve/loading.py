"""Load what a server serves: one copy of each base model, every LoRA version as an adapter on it, fully fine-tuned
(and DoRA) versions as models of their own."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.template import end_of_turn_token_ids
from tunesmith.errors import TunesmithError
from tunesmith.generation.engine import ModelGroup, Route
from tunesmith.models import attach_adapter, load_model, load_tokenizer
from tunesmith.serve.targets import ServedTarget


@dataclass
class ServedModel:
    """A served name: its route in the engine, the tokenizer that renders its prompts, and how /v1/models lists it."""

    name: str
    route: Route
    tokenizer: object
    parent: str | None
    root: str
    context_length: int | None


def load_served_models(targets: list[ServedTarget], serve_base: bool = True,
                       device: str | None = None) -> dict[str, ServedModel]:
    """Every target (and, with `serve_base`, each base under its own name), weights verified, templates checked;
    the adapters of one base share one copy of it."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    served: dict[str, ServedModel] = {}
    shared: dict[str, ModelGroup] = {}
    for target in targets:
        if not target.run.is_trained:
            continue  # nothing of its own: served as its base, below
        group, adapter = _place(target, shared, device)
        source = target.run.weights_dir
        tokenizer = load_tokenizer(source)
        target.run.check_template(tokenizer, whose=f"the model in {source}")
        served[target.name] = _served(target.name, group, adapter, tokenizer, target.base_name, str(target.run_dir))
    for target in targets:
        if serve_base or not target.run.is_trained:
            _serve_base(target, served, shared, device)
    return served


def _serve_base(target: ServedTarget, served: dict[str, ServedModel], shared: dict[str, ModelGroup],
                device: str) -> None:
    if any(model.root == target.base_key and model.parent is None for model in served.values()):
        return  # this base is served already
    name = target.base_name if target.base_name not in served else target.base_name + "-base"
    group = shared.get(target.base_key) or _shared_group(target.base_key, shared, device)
    served[name] = _served(name, group, None, load_tokenizer(target.base_key), None, target.base_key)


def _place(target: ServedTarget, shared: dict[str, ModelGroup], device: str) -> tuple[ModelGroup, str | None]:
    """The group a target decodes in and its adapter name there."""
    run = target.run
    run.verify_weights()
    marker = "config.json" if run.is_full_fine_tune else "adapter_config.json"
    if not (run.weights_dir / marker).is_file():
        raise TunesmithError(f"{run.weights_dir}: no {marker}; re-run `tunesmith train` for this run")
    if run.is_full_fine_tune:
        return ModelGroup(load_model(run.weights_dir).to(device), mixes_adapters=False), None
    if _uses_dora(run.weights_dir):
        # peft cannot mix DoRA rows with others in one batch: this version decodes on a base copy of its own.
        own = attach_adapter(load_model(target.base_key), run.weights_dir, "own").to(device)
        return ModelGroup(own, mixes_adapters=False), None
    group = shared.get(target.base_key) or _shared_group(target.base_key, shared, device)
    adapter = f"served{len(group.model.peft_config) if hasattr(group.model, 'peft_config') else 0}"
    model = attach_adapter(group.model, run.weights_dir, adapter).to(device)
    model.eval()
    if model is not group.model:  # the first adapter turned the plain base into a PeftModel
        _replace_model(group, model, shared, target.base_key)
    return group, adapter


def _shared_group(base_key: str, shared: dict[str, ModelGroup], device: str) -> ModelGroup:
    shared[base_key] = ModelGroup(load_model(base_key).to(device), mixes_adapters=False)
    return shared[base_key]


def _replace_model(group: ModelGroup, model, shared: dict[str, ModelGroup], base_key: str) -> None:
    group.model, group.mixes_adapters = model, True
    shared[base_key] = group


def _uses_dora(adapter_dir) -> bool:
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return bool(config.get("use_dora"))


def _served(name: str, group: ModelGroup, adapter: str | None, tokenizer, parent, root: str) -> ServedModel:
    from tokenizers import Tokenizer

    stops = frozenset(end_of_turn_token_ids(tokenizer))
    decoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # the engine thread's own copy
    route = Route(group, adapter, stops, decoder)
    context = getattr(group.model.config, "max_position_embeddings", None)
    return ServedModel(name, route, tokenizer, parent, root, context)
