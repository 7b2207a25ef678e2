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

    def __init__(self, slot_of: dict[str, int]):
        self.slot_of = slot_of
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
            if self.rows.uniform == 0:
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


def stack_adapters(peft_model, adapters: list[str]):
    """The base model with every adapted layer replaced by a MultiLoraLinear over `adapters` (slots 1..n, in this
    order); returns (model, AdapterRows). The peft wrapper is gone afterwards: the model answers as the base unless
    rows select an adapter."""
    import torch
    from peft.tuners.lora import LoraLayer

    rows = AdapterRows({name: slot for slot, name in enumerate(adapters, start=1)})
    layer_class = multi_lora_layer_class()
    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.base_layer
        present = [a for a in adapters if a in module.lora_A]
        if not present:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, base)
            continue
        rank = max(module.lora_A[a].weight.shape[0] for a in present)
        stacked_a = torch.zeros(len(adapters) + 1, base.in_features, rank, dtype=base.weight.dtype,
                                device=base.weight.device)
        stacked_b = torch.zeros(len(adapters) + 1, rank, base.out_features, dtype=base.weight.dtype,
                                device=base.weight.device)
        for slot, adapter in enumerate(adapters, start=1):
            if adapter not in module.lora_A:
                continue
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight  # [r, in], [out, r]
            r = a.shape[0]
            stacked_a[slot, :, :r] = a.t()
            stacked_b[slot, :r, :] = b.t() * module.scaling[adapter]
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer_class(base, rows, stacked_a, stacked_b))
    leftover = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if leftover:
        raise TunesmithError(f"could not stack the adapters: {leftover[0]} is still a peft layer")
    model.eval()
    return model, rows
