"""Load what a server serves: one copy of each base model carrying every LoRA version on it (stacked, so rows of
different versions share a batch), fully fine-tuned versions (and adapters that cannot be stacked, such as DoRA) as
models of their own."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.template import end_of_turn_token_ids
from tunesmith.errors import TunesmithError
from tunesmith.generation.engine import ModelGroup, Route
from tunesmith.generation.multi_lora import stack_adapters, unsupported_reason
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
    note: str = ""
    """Why it decodes on a model of its own, when it is an adapter that could not share its base."""


def load_served_models(targets: list[ServedTarget], serve_base: bool = True,
                       device: str | None = None) -> dict[str, ServedModel]:
    """Every trained target (and each base under its own name, with `serve_base` or for untrained targets),
    weights verified, chat templates checked; the LoRA versions of one base share one copy of it."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    trained = [target for target in targets if target.run.is_trained]
    for target in trained:
        _check_weights(target)
    loaded: dict[str, object] = {}  # versions trained with the same tokenizer files share one copy of it
    tokenizers = {target.name: _checked_tokenizer(target, loaded) for target in trained}
    decoders: dict[int, object] = {}  # by id of a tokenizer held in `tokenizers` or a served model, so never reused
    bases = {t.base_key for t in targets if serve_base or not t.run.is_trained or t.is_adapter}
    placed = {}
    for base_key in sorted(bases):
        adapters = [t for t in trained if t.is_adapter and t.base_key == base_key]
        placed.update(_share_base(base_key, adapters, device))
    served: dict[str, ServedModel] = {}
    for target in trained:
        if target.name not in placed:  # fully fine-tuned
            placed[target.name] = (ModelGroup(load_model(target.run.weights_dir).to(device)), None, "")
        group, adapter, note = placed[target.name]
        served[target.name] = _served(target.name, group, adapter, tokenizers[target.name], decoders, target.base_name,
                                      str(target.run_dir), note)
    for target in targets:
        if serve_base or not target.run.is_trained:
            _serve_base(target, served, placed[("base", target.base_key)][0], decoders)
    return served


def _check_weights(target: ServedTarget) -> None:
    run = target.run
    run.verify_weights()
    marker = "config.json" if run.is_full_fine_tune else "adapter_config.json"
    if not (run.weights_dir / marker).is_file():
        raise TunesmithError(f"{run.weights_dir}: no {marker}; re-run `tunesmith train` for this run")


def _checked_tokenizer(target: ServedTarget, loaded: dict[str, object]):
    # The trained folder holds the tokenizer training used, so the template is exactly the trained one.
    from tunesmith.registry.hashing import file_sha256

    folder = target.run.weights_dir
    key = "|".join(file_sha256(path) for path in sorted(folder.glob("*")) if path.name.startswith(("tokenizer",
                                                                                                "chat_template",
                                                                                                "special_tokens")))
    if key not in loaded:
        loaded[key] = load_tokenizer(folder)
    target.run.check_template(loaded[key], whose=f"the model in {folder}")
    return loaded[key]


def _share_base(base_key: str, adapters: list[ServedTarget], device: str) -> dict:
    """One copy of the base with every stackable adapter on it; an adapter that cannot be stacked gets a copy of its
    own. Keys: served names, and ("base", base_key) for the shared base itself."""
    placed, stackable, peft_model = {}, [], None
    for index, target in enumerate(adapters):
        name = f"served{index}"
        peft_model = attach_adapter(peft_model or load_model(base_key), target.run.weights_dir, name)
        reason = unsupported_reason(peft_model, name)
        if reason:
            peft_model.delete_adapter(name)
            own = attach_adapter(load_model(base_key), target.run.weights_dir, "own").to(device)
            placed[target.name] = (ModelGroup(own), None, f"decodes on a base copy of its own: {reason}")
        else:
            stackable.append((target, name))
    if peft_model is not None and stackable:
        # The first version named on this base is merged into it: its rows then cost what the base alone does.
        model, rows = stack_adapters(peft_model, [name for _, name in stackable], merge_first=True)
        group = ModelGroup(model.to(device), adapter_rows=rows)
        for target, name in stackable:
            placed[target.name] = (group, name, "")
    else:  # no adapter shares this base (those that tried got copies of their own)
        group = ModelGroup(load_model(base_key).to(device))
    placed[("base", base_key)] = (group, None, "")
    return placed


def _serve_base(target: ServedTarget, served: dict[str, ServedModel], group: ModelGroup, decoders: dict) -> None:
    if any(model.root == target.base_key and model.parent is None for model in served.values()):
        return  # this base is served already
    name = target.base_name if target.base_name not in served else target.base_name + "-base"
    tokenizer = load_tokenizer(target.base_key)
    if not target.run.is_trained:
        target.run.check_template(tokenizer, whose=f"the model in {target.base_key}")
    served[name] = _served(name, group, None, tokenizer, decoders, None, target.base_key)


def _served(name: str, group: ModelGroup, adapter: str | None, tokenizer, decoders: dict, parent, root: str,
            note: str = "") -> ServedModel:
    from tokenizers import Tokenizer

    stops = frozenset(end_of_turn_token_ids(tokenizer))
    if id(tokenizer) not in decoders:  # the engine thread's own copy, one per distinct tokenizer of this server
        decoders[id(tokenizer)] = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    decoder = decoders[id(tokenizer)]
    route = Route(group, adapter, stops, decoder)
    context = getattr(group.model.config, "max_position_embeddings", None)
    return ServedModel(name, route, tokenizer, parent, root, context, note)
