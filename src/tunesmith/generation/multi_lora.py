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

from tunesmith.errors import TunesmithError


DENSE_MIX_COLUMNS = 256
"""Up to this many columns (slots x rank), a mixed pass multiplies every row by all adapters at once."""


class AdapterRows:
    """Which adapter slot each row of the next forward pass uses; shared by all MultiLoraLinear layers of a model."""

    def __init__(self, slot_of: dict[str, int], free_slot: int = 0):
        self.slot_of = slot_of
        self.free_slot = free_slot
        """The slot whose rows need no low-rank update: 0 (the base), or the adapter merged into the base weights."""
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

    def column_mask(self, rank: int, dtype):
        """[rows, 1, slots x rank]: 1 on the columns of each row's own adapter (made once per pass and rank)."""
        import torch

        key = (rank, dtype)
        if key not in self._masks:
            slot_of_column = torch.arange(len(self.slot_of) + 1, device=self.slots.device).repeat_interleave(rank)
            self._masks[key] = (slot_of_column[None, :] == self.slots[:, None]).to(dtype)[:, None, :]
        return self._masks[key]


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
                mask = self.rows.column_mask(self.rank, x.dtype)
                return result + ((x @ self.all_a) * mask) @ self.all_b
            slots = self.rows.slots
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            per_slot_a = self.all_a.view(-1, self.slots, self.rank).permute(1, 0, 2)  # [slots, in, rank]
            per_slot_b = self.all_b.view(self.slots, self.rank, -1)
            update = torch.bmm(torch.bmm(flat, per_slot_a[slots]), per_slot_b[slots])
            return result + update.reshape(*x.shape[:-1], update.shape[-1])

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
    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.base_layer
        updates = {slot_of[a]: _low_rank_update(module, a) for a in adapters if a in module.lora_A}
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


def _low_rank_update(module, adapter: str):
    """(A as [in, r], B as [r, out] with the scale folded in) of one adapter on one peft LoRA layer."""
    a, b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()  # [r, in], [out, r]
    return a.t().float(), (b.t() * module.scaling[adapter]).float()
