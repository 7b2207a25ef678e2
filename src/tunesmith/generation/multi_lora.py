"""Many LoRA adapters on one base model, each row of a batch with its own adapter, as punica/LoRAX do it.

peft loads and checks the adapters; then every adapted linear layer is swapped for a `MultiLoraLinear` that holds
all adapters' A side by side ([in, slots x rank]) and B stacked ([slots x rank, out]); slot 0 is "no adapter", all
zeros, and the scale is folded into B. A pass where every row uses one adapter costs two small matmuls per layer.
A mixed pass multiplies every row by all adapters' A at once (slots x rank columns, a few dozen), zeroes the
columns of the adapters a row does not use, and multiplies by all B at once: two matmuls, no gathers, so mixing
adapters costs about what one adapter does (peft's own mixed-batch path loops over the adapters with a gather and a
scatter each, in every layer). With many adapters of high rank the dense product grows, so rows then gather their
own A and B for two batched matmuls. Plain torch ops: the same code runs on CUDA.
"""

from __future__ import annotations

from functools import cache

from tunesmith.errors import TunesmithError


DENSE_MIX_COLUMNS = 256
"""Up to this many columns (slots x rank), a mixed pass multiplies every row by all adapters at once."""


class AdapterRows:
    """Which adapter slot each row of the next forward pass uses; shared by all MultiLoraLinear layers of a model."""

    def __init__(self, slot_of: dict[str, int], free_slot: int = 0):
        self.slot_of = slot_of
        self.free_slot = free_slot
        """The slot whose rows need no low-rank update: 0 (the base), the adapter merged into the base weights, or -1
        (none: that adapter was removed, its update stays in the base weights and slot 0 still undoes it)."""
        self.slot_count = len(slot_of) + 1
        """Slots every MultiLoraLinear of the model holds, slot 0 included."""
        self.unused: list[int] = []
        """Slots of removed adapters, zeroed, for the next adapter added."""
        self.uniform: int | None = 0
        self.slots = None
        self._masks: dict[tuple, object] = {}

    def select(self, adapters: list[str | None], device) -> None:
        import torch

        slots = [self.slot_of[name] if name else 0 for name in adapters]
        self._masks = {}
        if len(set(slots)) == 1:
            self.uniform, self.slots = slots[0], None
        else:
            self.uniform, self.slots = None, torch.tensor(slots, dtype=torch.long, device=device)

    def column_mask(self, slots: int, rank: int, dtype):
        """[rows, 1, slots x rank]: 1 on the columns of each row's own adapter (made once per pass and shape)."""
        import torch

        key = (slots, rank, dtype)
        if key not in self._masks:
            slot_of_column = torch.arange(slots, device=self.slots.device).repeat_interleave(rank)
            self._masks[key] = (slot_of_column[None, :] == self.slots[:, None]).to(dtype)[:, None, :]
        return self._masks[key]


@cache  # one class, so that isinstance finds the layers of every stacked model
def multi_lora_layer_class():
    import torch

    class MultiLoraLinear(torch.nn.Module):
        """A base linear layer plus every adapter's low-rank update, chosen per row by `AdapterRows`."""

        def __init__(self, base_layer, rows: AdapterRows, a, b):
            """`a` [slots, in, rank] and `b` [slots, rank, out] (scale folded in) are kept side by side, once."""
            super().__init__()
            self.base_layer, self.rows = base_layer, rows
            self.slots, self.rank = a.shape[0], a.shape[-1]
            self.register_buffer("all_a", a.permute(1, 0, 2).reshape(a.shape[1], self.slots * self.rank).contiguous(),
                                 persistent=False)  # [in, slots x rank]
            self.register_buffer("all_b", b.reshape(self.slots * self.rank, b.shape[-1]).contiguous(),
                                 persistent=False)  # [slots x rank, out]
            self.dense_mix = self.slots * self.rank <= DENSE_MIX_COLUMNS

        def forward(self, x):
            result = self.base_layer(x)
            if self.rows.uniform == self.rows.free_slot:
                return result
            if self.rows.uniform is not None:
                columns = slice(self.rows.uniform * self.rank, (self.rows.uniform + 1) * self.rank)
                return result + (x @ self.all_a[:, columns]) @ self.all_b[columns]
            if self.dense_mix:
                mask = self.rows.column_mask(self.slots, self.rank, x.dtype)
                return result + ((x @ self.all_a) * mask) @ self.all_b
            slots = self.rows.slots
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            per_slot_a = self.all_a.view(-1, self.slots, self.rank).permute(1, 0, 2)  # [slots, in, rank]
            per_slot_b = self.all_b.view(self.slots, self.rank, -1)
            update = torch.bmm(torch.bmm(flat, per_slot_a[slots]), per_slot_b[slots])
            return result + update.reshape(*x.shape[:-1], update.shape[-1])

        def slot_update(self, slot: int):
            """(A [in, rank], B [rank, out]) held in one slot, zero-padded to the layer's rank."""
            return (self.all_a.view(-1, self.slots, self.rank)[:, slot],
                    self.all_b.view(self.slots, self.rank, -1)[slot])

        @torch.no_grad()
        def set_slot(self, slot: int, a, b, slots: int) -> None:
            """Hold (a [in, r], b [r, out]) in `slot`, the rest of it zero, growing to `slots` slots and rank r."""
            slots, rank = max(slots, self.slots), max(self.rank, a.shape[1])
            in_features, out_features = self.all_a.shape[0], self.all_b.shape[1]
            stacked_a = self.all_a.new_zeros(in_features, slots, rank)
            stacked_b = self.all_b.new_zeros(slots, rank, out_features)
            stacked_a[:, :self.slots, :self.rank] = self.all_a.view(in_features, self.slots, self.rank)
            stacked_b[:self.slots, :self.rank] = self.all_b.view(self.slots, self.rank, out_features)
            stacked_a[:, slot] = 0
            stacked_b[slot] = 0
            stacked_a[:, slot, :a.shape[1]] = a.to(stacked_a)
            stacked_b[slot, :b.shape[0]] = b.to(stacked_b)
            self.all_a = stacked_a.reshape(in_features, slots * rank)
            self.all_b = stacked_b.reshape(slots * rank, out_features)
            self.slots, self.rank = slots, rank
            self.dense_mix = slots * rank <= DENSE_MIX_COLUMNS

    return MultiLoraLinear


def unsupported_reason(peft_model, adapter: str) -> str | None:
    """Why this adapter cannot share a batch with others (None when it can): DoRA, trained biases, saved copies of
    whole modules, or adapted layers that are not plain linear ones."""
    import torch
    from peft.tuners.lora import LoraLayer

    config = peft_model.peft_config[adapter]
    if getattr(config, "use_dora", False):
        return "it uses DoRA"
    if getattr(config, "modules_to_save", None):
        return "it saves whole modules (modules_to_save)"
    if getattr(config, "lora_bias", False):
        return "it trains biases"
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if not isinstance(module.base_layer, torch.nn.Linear) or adapter in getattr(module, "lora_variant", {}):
                return f"it adapts a {type(module.base_layer).__name__} layer"
    return None


def stack_adapters(peft_model, adapters: list[str], merge_first: bool = False):
    """The base model with every adapted layer replaced by a MultiLoraLinear over `adapters` (slots 1..n, in this
    order); returns (model, AdapterRows). The peft wrapper is gone afterwards.

    With `merge_first`, the first adapter (the version most traffic goes to) is merged into the base weights, so its
    rows cost what the base alone does; the base's rows then subtract that update (slot 0 holds A, -B) and every
    other adapter's rows apply their own update minus it (rank r + r_first)."""
    import torch
    from peft.tuners.lora import LoraLayer

    slot_of = {name: slot for slot, name in enumerate(adapters, start=1)}
    rows = AdapterRows(slot_of, free_slot=1 if merge_first else 0)
    layer_class = multi_lora_layer_class()
    per_adapter = {adapter: low_rank_updates(peft_model, adapter) for adapter in adapters}
    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.base_layer
        updates = {slot_of[a]: per_adapter[a][name] for a in adapters if name in per_adapter[a]}
        parent_name, _, child = name.rpartition(".")
        if not updates:
            setattr(model.get_submodule(parent_name), child, base)
            continue
        if merge_first and 1 in updates:
            a_first, b_first = updates.pop(1)
            with torch.no_grad():
                base.weight += (a_first @ b_first).t().to(base.weight.dtype)
            for slot, (a, b) in list(updates.items()):
                updates[slot] = (torch.cat([a, a_first], dim=1), torch.cat([b, -b_first], dim=0))
            for slot in range(2, len(adapters) + 1):  # adapters without an update here still undo the merged one
                updates.setdefault(slot, (a_first, -b_first))
            updates[0] = (a_first, -b_first)
        rank = max(a.shape[1] for a, _ in updates.values())
        stacked_a = torch.zeros(len(adapters) + 1, base.in_features, rank, dtype=base.weight.dtype,
                                device=base.weight.device)
        stacked_b = torch.zeros(len(adapters) + 1, rank, base.out_features, dtype=base.weight.dtype,
                                device=base.weight.device)
        for slot, (a, b) in updates.items():
            stacked_a[slot, :, :a.shape[1]] = a
            stacked_b[slot, :b.shape[0], :] = b
        setattr(model.get_submodule(parent_name), child, layer_class(base, rows, stacked_a, stacked_b))
    leftover = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if leftover:
        raise TunesmithError(f"could not stack the adapters: {leftover[0]} is still a peft layer")
    model.eval()
    return model, rows


def low_rank_updates(peft_model, adapter: str) -> dict[str, tuple]:
    """(A [in, r], B [r, out] with the scale folded in) of one adapter, by module name in the base model."""
    from peft.tuners.lora import LoraLayer

    return {name: _low_rank_update(module, adapter) for name, module in peft_model.get_base_model().named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A}


def add_stacked_adapter(model, rows: AdapterRows, name: str, updates: dict[str, tuple]) -> None:
    """Give one more adapter (its `low_rank_updates`) a slot of a stacked model: a removed adapter's slot, else a
    new last one. Call it between forward passes. Its rows also undo a merged version, as `stack_adapters` does."""
    import torch

    layer_class = multi_lora_layer_class()
    slot = min(rows.unused) if rows.unused else rows.slot_count
    slots = max(rows.slot_count, slot + 1)
    for module_name, module in list(model.named_modules()):
        update = updates.get(module_name)
        if isinstance(module, layer_class):
            module.set_slot(slot, *_joined(update, module.slot_update(0), module), slots)
        elif update is not None:  # a layer no served adapter adapted yet
            if not isinstance(module, torch.nn.Linear):
                raise TunesmithError(f"could not stack the adapter: it adapts {module_name}, a "
                                     f"{type(module).__name__} layer")
            empty = (module.weight.new_zeros(slots, module.in_features, 0),
                     module.weight.new_zeros(slots, 0, module.out_features))
            layer = layer_class(module, rows, *empty)
            layer.set_slot(slot, *update, slots)
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
    # Registered last: a failure above leaves the slot unused by any row, to be overwritten next time.
    rows.slot_of[name], rows.slot_count = slot, slots
    if slot in rows.unused:
        rows.unused.remove(slot)


def remove_stacked_adapter(model, rows: AdapterRows, name: str) -> None:
    """Zero an adapter's slot, to be reused by the next adapter added. Call it once no row uses the adapter."""
    layer_class = multi_lora_layer_class()
    slot = rows.slot_of.pop(name)
    for module in model.modules():
        if isinstance(module, layer_class):
            module.set_slot(slot, module.all_a[:, :0], module.all_b[:0], module.slots)
    if slot == rows.free_slot:  # the merged version: its update stays in the base weights, slot 0 still undoes it
        rows.free_slot = -1
    rows.unused.append(slot)


def _joined(update, base_rows_update, layer):
    """An adapter's update plus what slot 0 holds (minus the merged version's update, when one is merged)."""
    import torch

    parts = [part for part in (update, base_rows_update) if part is not None and part[1].any()]
    if not parts:
        return layer.all_a[:, :0], layer.all_b[:0]
    return torch.cat([a.to(layer.all_a) for a, _ in parts], dim=1), torch.cat([b.to(layer.all_b) for _, b in parts])


def _low_rank_update(module, adapter: str):
    """(A as [in, r], B as [r, out] with the scale folded in) of one adapter on one peft LoRA layer."""
    a, b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()  # [r, in], [out, r]
    return a.t().float(), (b.t() * module.scaling[adapter]).float()
