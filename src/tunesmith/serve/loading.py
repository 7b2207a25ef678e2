"""Load what a server serves: one copy of each base model carrying every LoRA version on it (stacked, so rows of
different versions share a batch), fully fine-tuned versions (and adapters that cannot be stacked, such as DoRA) as
models of their own; at start, and one version at a time while serving."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Callable

from tunesmith.data.template import end_of_turn_token_ids
from tunesmith.errors import TunesmithError
from tunesmith.generation.engine import Route
from tunesmith.generation.model_group import ModelGroup
from tunesmith.generation.multi_lora import low_rank_updates, stack_adapters, unsupported_reason
from tunesmith.models import attach_adapter, load_model, load_tokenizer, refuse_pickled_weights
from tunesmith.machine import pick_precision
from tunesmith.serve.targets import ServedTarget


@dataclass
class ServedModel:
    """A loaded version: its route in the engine, the tokenizer that renders its prompts, and how /v1/models lists
    it. `name` is its engine name (`orders@3`); served names (`orders@production`) map to it."""

    name: str
    route: Route
    tokenizer: object
    parent: str | None
    root: str
    context_length: int | None
    note: str = ""
    """Why it decodes on a model of its own, when it is an adapter that could not share its base."""
    registry_model: str | None = None
    registry_version: str | None = None


class ModelLoader:
    """Loads versions onto one device and keeps what later versions share: one copy of each base (by base key),
    one tokenizer per set of tokenizer files, one engine-side decoder per tokenizer."""

    def __init__(self, device: str | None = None, precision: str = "fp32"):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if pick_precision(precision) == "bf16" else torch.float32
        """What the weights are computed in; bf16 rounds them after merging (a merged adapter keeps full precision
        until then)."""
        self.bases: dict[str, ModelGroup] = {}
        self._tokenizers: dict[str, object] = {}  # by the hashes of the tokenizer files
        self._decoders: dict[int, tuple[object, object]] = {}  # id -> (tokenizer, decoder): holding it keeps its id
        self._adapter_names = (f"served{n}" for n in itertools.count())  # never reused: they key the prefix cache

    def load_targets(self, targets: list[ServedTarget], serve_base: bool = True) -> dict[str, ServedModel]:
        """Served name -> version for every trained target (and each base under its own name, with `serve_base` or
        for untrained targets), weights verified, chat templates checked; names of one version share it."""
        trained = list({t.engine_name: t for t in targets if t.run.is_trained}.values())  # each version once
        for target in trained:
            check_weights(target)
        tokenizers = {target.engine_name: self._checked_tokenizer(target) for target in trained}
        placed = {}
        for base_key in sorted({t.base_key for t in targets if serve_base or not t.run.is_trained or t.is_adapter}):
            placed.update(self._share_base(base_key, [t for t in trained if t.is_adapter and t.base_key == base_key]))
        versions = {}
        for target in trained:
            if target.engine_name not in placed:  # fully fine-tuned
                placed[target.engine_name] = (self._own_model(target), None, "")
            group, adapter, note = placed[target.engine_name]
            versions[target.engine_name] = self._served(target, group, adapter, tokenizers[target.engine_name], note)
        served = {target.name: versions[target.engine_name] for target in targets if target.run.is_trained}
        for target in targets:
            if serve_base or not target.run.is_trained:
                self._serve_base(target, served)
        return served

    def load_version(self, target: ServedTarget) -> tuple[ServedModel, Callable[[], None] | None]:
        """One trained version while serving, and what must run on the engine thread before its route is used
        (giving its adapter a slot on the shared base), if anything."""
        if not target.run.is_trained:
            raise TunesmithError(f"{target.run_dir} has not been trained yet; serve a trained run or a registered "
                                 "version")
        check_weights(target)
        tokenizer = self._checked_tokenizer(target)
        prepare = None
        if not target.is_adapter:
            group, adapter, note = self._own_model(target), None, ""
        elif target.base_key not in self.bases:
            group, adapter, note = self._share_base(target.base_key, [target])[target.engine_name]
        else:
            group, adapter, note = self.bases[target.base_key], next(self._adapter_names), ""
            updates, reason = _adapter_updates(group.model.config, target)
            if reason:
                group, adapter, note = self._own_copy(target, reason)
            else:
                prepare = partial(group.add_adapter, adapter, updates)
        return self._served(target, group, adapter, tokenizer, note), prepare

    def release(self, route: Route, group_still_served: bool) -> None:
        """Free what a dropped route held: its adapter's slot, and the base copy when nothing decodes on it. Call it
        on the engine thread, once no row uses the route."""
        group = route.group
        if route.adapter is not None and group.adapter_rows is not None:
            group.remove_adapter(route.adapter)
        if not group_still_served:
            self.bases = {key: base for key, base in self.bases.items() if base is not group}

    def _checked_tokenizer(self, target: ServedTarget):
        # The trained folder holds the tokenizer training used, so the template is exactly the trained one.
        from tunesmith.registry.hashing import file_sha256

        folder = target.run.weights_dir
        key = "|".join(file_sha256(path) for path in sorted(folder.glob("*"))
                       if path.name.startswith(("tokenizer", "chat_template", "special_tokens")))
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(folder)
        target.run.check_template(self._tokenizers[key], whose=f"the model in {folder}")
        return self._tokenizers[key]

    def _share_base(self, base_key: str, adapters: list[ServedTarget]) -> dict:
        """One copy of the base with every stackable adapter on it; an adapter that cannot be stacked gets a copy of
        its own. Keys: engine names (values: group, adapter, note); the shared base lands in `bases`."""
        placed, stackable, peft_model = {}, [], None
        for target in adapters:
            name = next(self._adapter_names)
            peft_model = attach_adapter(peft_model or load_model(base_key), target.run.weights_dir, name)
            reason = unsupported_reason(peft_model, name)
            if reason:
                peft_model.delete_adapter(name)
                placed[target.engine_name] = self._own_copy(target, reason)
            else:
                stackable.append((target, name))
        if peft_model is not None and stackable:
            # The first version named on this base is merged into it: its rows then cost what the base alone does.
            model, rows = stack_adapters(peft_model, [name for _, name in stackable], merge_first=True)
            group = ModelGroup(model.to(self.device, self.dtype), adapter_rows=rows)
            for target, name in stackable:
                placed[target.engine_name] = (group, name, "")
        else:  # no adapter shares this base (those that tried got copies of their own)
            group = ModelGroup(load_model(base_key).to(self.device, self.dtype))
        self.bases[base_key] = group
        return placed

    def _own_model(self, target: ServedTarget) -> ModelGroup:
        return ModelGroup(load_model(target.run.weights_dir).to(self.device, self.dtype))

    def _own_copy(self, target: ServedTarget, reason: str) -> tuple[ModelGroup, None, str]:
        own = attach_adapter(load_model(target.base_key), target.run.weights_dir, "own").to(self.device, self.dtype)
        return ModelGroup(own), None, f"decodes on a base copy of its own: {reason}"

    def _serve_base(self, target: ServedTarget, served: dict[str, ServedModel]) -> None:
        if any(model.root == target.base_key and model.parent is None for model in served.values()):
            return  # this base is served already
        name = target.base_name if target.base_name not in served else target.base_name + "-base"
        tokenizer = load_tokenizer(target.base_key)
        if not target.run.is_trained:
            target.run.check_template(tokenizer, whose=f"the model in {target.base_key}")
        served[name] = self._route(name, self.bases[target.base_key], None, tokenizer, None, target.base_key)

    def _served(self, target: ServedTarget, group: ModelGroup, adapter: str | None, tokenizer,
                note: str) -> ServedModel:
        served = self._route(target.engine_name, group, adapter, tokenizer, target.base_name, str(target.run_dir), note)
        served.registry_model, served.registry_version = target.model, target.version
        return served

    def _route(self, name: str, group: ModelGroup, adapter: str | None, tokenizer, parent, root: str,
               note: str = "") -> ServedModel:
        from tokenizers import Tokenizer

        stops = frozenset(end_of_turn_token_ids(tokenizer))
        if id(tokenizer) not in self._decoders:  # the engine thread's own copy, one per distinct tokenizer
            self._decoders[id(tokenizer)] = (tokenizer, Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
        route = Route(group, adapter, stops, self._decoders[id(tokenizer)][1])
        context = getattr(group.model.config, "max_position_embeddings", None)
        return ServedModel(name, route, tokenizer, parent, root, context, note)


def check_weights(target: ServedTarget) -> None:
    """Safetensors only, unchanged since training, with the config that says what they are."""
    run = target.run
    if run.weights_dir.is_dir():
        refuse_pickled_weights(run.weights_dir)
    run.verify_weights()
    marker = "config.json" if run.is_full_fine_tune else "adapter_config.json"
    if not (run.weights_dir / marker).is_file():
        raise TunesmithError(f"{run.weights_dir}: no {marker}; re-run `tunesmith train` for this run")


def _adapter_updates(base_config, target: ServedTarget) -> tuple[dict | None, str | None]:
    """The adapter's low-rank updates, read through peft on a weightless (meta-device) copy of its base, or why it
    cannot be stacked; the base itself is never loaded again."""
    import warnings

    import torch
    from peft import set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    adapter_dir = target.run.weights_dir
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that nothing is copied into meta tensors: the copy is below
        peft_model = attach_adapter(skeleton, adapter_dir, "probe")
    reason = unsupported_reason(peft_model, "probe")
    if reason:
        return None, reason
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "probe" in module.lora_A:
            module.lora_A["probe"].to_empty(device="cpu")
            module.lora_B["probe"].to_empty(device="cpu")
    set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter_dir), device="cpu"), adapter_name="probe")
    return low_rank_updates(peft_model, "probe"), None
