"""Many LoRA adapters on one base model, each row of a batch with its own adapter, as punica/LoRAX do it.

peft loads and checks the adapters; then every adapted linear layer is swapped for a `MultiLoraLinear` that holds
all adapters' A side by side ([in, columns]) and B stacked ([columns, out]), the scale folded into B. Its columns
come in blocks, each owned by one adapter slot. A mixed pass multiplies every row by all the A at once, zeroes the
columns of the blocks a row does not use, and multiplies by all the B at once: two matmuls, no gathers, so mixing
adapters costs about what one adapter does (peft's own mixed-batch path loops over the adapters with a gather and a
scatter each, in every layer). Sibling layers (q/k/v, gate/up) go further and share those two products (see
`sibling_lora`). With many adapters of high rank the dense product grows, so rows then gather their own A and B for
two batched matmuls. Plain torch ops: the same code runs on CUDA.

Slot 0 is the base model. The version most traffic goes to can be merged into the base weights (`merge_first`):
its rows then cost what the base alone does, and one shared "undo" block (its A, minus its B) serves every other
row, so each adapter's columns are held once, at its own rank.
"""

from __future__ import annotations

from functools import cache

from tunesmith.errors import TunesmithError


DENSE_MIX_COLUMNS = 256
"""Up to this many columns, a mixed pass multiplies every row by all adapters at once."""

UNDO = -1
"""Owner of a block used by every row not on the merged version (`AdapterRows.free_slot`): it undoes the merge."""


class AdapterRows:
    """Which adapter slot each row of the next forward pass uses; shared by all MultiLoraLinear layers of a model."""

    def __init__(self, slot_of: dict[str, int], free_slot: int = 0):
        self.slot_of = slot_of
        self.free_slot = free_slot
        """The slot whose rows need no low-rank update: 0 (the base), the adapter merged into the base weights, or -1
        (none: that adapter was removed, its update stays in the base weights and the undo blocks stay for all)."""
        self.slot_count = len(slot_of) + 1
        """Slots in use or reusable, slot 0 included."""
        self.unused: list[int] = []
        """Slots of removed adapters, for the next adapter added."""
        self.uniform: int | None = 0
        self.slots = None
        self.device = None
        self.along_tokens = False
        """Whether `select` named one adapter per token of a single sequence (a fused step) instead of per row."""
        self._masks: dict[tuple, object] = {}

    def select(self, adapters: list[str | None], device, along_tokens: bool = False) -> None:
        import torch

        slots = [self.slot_of[name] if name else 0 for name in adapters]
        self._masks, self.device, self.along_tokens = {}, device, along_tokens
        if len(set(slots)) == 1:
            self.uniform, self.slots = slots[0], None
        else:
            self.uniform, self.slots = None, torch.tensor(slots, dtype=torch.long, device=device)

    def row_slots(self):
        """[rows] slots of the pass ([1] when every row uses one adapter)."""
        import torch

        return self.slots if self.uniform is None else torch.tensor([self.uniform], device=self.device)

    def columns_mask(self, blocks: tuple[tuple[int, int], ...], dtype):
        """[rows, 1, columns] (or [1, 1, columns] when every row uses one adapter; [1, tokens, columns] along tokens):
        1 on the columns of the blocks (width, owner) each row uses; made once per pass and layout."""
        key = (blocks, dtype)
        if key not in self._masks:
            used = self.used_columns(blocks, self.row_slots()).to(dtype)
            self._masks[key] = used[None, :, :] if self.along_tokens else used[:, None, :]
        return self._masks[key]

    def used_columns(self, blocks: tuple[tuple[int, int], ...], slots):
        """[len(slots), columns] booleans: the columns of the blocks (width, owner) that rows of each slot use."""
        import torch

        owner = torch.tensor([owner for width, owner in blocks for _ in range(width)], dtype=torch.long,
                             device=slots.device)
        return (owner[None, :] == slots[:, None]) | ((owner[None, :] == UNDO) & (slots[:, None] != self.free_slot))


@cache  # one class, so that isinstance finds the layers of every stacked model
def multi_lora_layer_class():
    import torch

    class MultiLoraLinear(torch.nn.Module):
        """A base linear layer plus every adapter's low-rank update, chosen per row by `AdapterRows`."""

        def __init__(self, base_layer, rows: AdapterRows, a, b, blocks: tuple[tuple[int, int], ...]):
            """`a` [in, columns] and `b` [columns, out] (scale folded in), in `blocks` of (width, owner slot)."""
            super().__init__()
            self.base_layer, self.rows = base_layer, rows
            self.register_buffer("all_a", a.contiguous(), persistent=False)
            self.register_buffer("all_b", b.contiguous(), persistent=False)
            self.blocks = blocks
            self.siblings, self.sibling_index = None, 0
            """Where the update is computed together with sibling layers' (see `sibling_lora`)."""
            self._per_slot = None

        @property
        def dense_mix(self) -> bool:
            return self.all_a.shape[1] <= DENSE_MIX_COLUMNS

        def forward(self, x):
            if self.siblings is not None:
                return self.siblings.output(self.sibling_index, x)
            result = self.base_layer(x)
            if self.rows.uniform == self.rows.free_slot or not self.blocks:
                return result
            if self.dense_mix:
                mask = self.rows.columns_mask(self.blocks, x.dtype)
                return result + ((x @ self.all_a) * mask) @ self.all_b
            per_slot_a, per_slot_b = self.per_slot()
            slots = self.rows.row_slots()
            flat = x.reshape(-1, 1, x.shape[-1]) if self.rows.along_tokens else x.reshape(x.shape[0], -1, x.shape[-1])
            update = torch.bmm(torch.bmm(flat, per_slot_a[slots].expand(flat.shape[0], -1, -1)),
                               per_slot_b[slots].expand(flat.shape[0], -1, -1))
            return result + update.reshape(*x.shape[:-1], update.shape[-1])

        def per_slot(self):
            """([slots, in, r], [slots, r, out]): the columns each slot's rows use, zero-padded to one width r."""
            if self._per_slot is None:
                slot_count = self.rows.slot_count
                used = self.rows.used_columns(self.blocks, torch.arange(slot_count, device=self.all_a.device))
                width = max(1, int(used.sum(dim=1).max()))
                a = self.all_a.new_zeros(slot_count, self.all_a.shape[0], width)
                b = self.all_b.new_zeros(slot_count, width, self.all_b.shape[1])
                for slot in range(slot_count):
                    columns = used[slot].nonzero().flatten()
                    a[slot, :, :len(columns)] = self.all_a[:, columns]
                    b[slot, :len(columns)] = self.all_b[columns]
                self._per_slot = (a, b)
            return self._per_slot

        @torch.no_grad()
        def add_block(self, a, b, owner: int) -> None:
            """Hold one more block: a [in, r], b [r, out] used by the rows of slot `owner`."""
            self.all_a = torch.cat([self.all_a, a.to(self.all_a)], dim=1)
            self.all_b = torch.cat([self.all_b, b.to(self.all_b)], dim=0)
            self.blocks = (*self.blocks, (a.shape[1], owner))
            self._per_slot = None

        @torch.no_grad()
        def drop_blocks(self, owner: int) -> None:
            """Forget the blocks of slot `owner`."""
            owners = [block_owner for width, block_owner in self.blocks for _ in range(width)]
            keep = [column for column, block_owner in enumerate(owners) if block_owner != owner]
            columns = torch.tensor(keep, dtype=torch.long, device=self.all_a.device)
            self.all_a = self.all_a[:, columns].contiguous()
            self.all_b = self.all_b[columns].contiguous()
            self.blocks = tuple(block for block in self.blocks if block[1] != owner)
            self._per_slot = None

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
    rows cost what the base alone does; every other row applies the shared undo block (its A, minus its B)."""
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
        owned = []
        if merge_first and 1 in updates:
            a_first, b_first = updates.pop(1)
            with torch.no_grad():
                base.weight += (a_first @ b_first).t().to(base.weight.dtype)
            owned.append((UNDO, a_first, -b_first))
        owned += [(slot, a, b) for slot, (a, b) in sorted(updates.items())]
        a = torch.cat([a for _, a, _ in owned], dim=1).to(base.weight)
        b = torch.cat([b for _, _, b in owned], dim=0).to(base.weight)
        blocks = tuple((part.shape[1], owner) for owner, part, _ in owned)
        setattr(model.get_submodule(parent_name), child, layer_class(base, rows, a, b, blocks))
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
    new last one. Call it between forward passes. Its rows also apply the undo blocks of a merged version."""
    import torch

    layer_class = multi_lora_layer_class()
    slot = min(rows.unused) if rows.unused else rows.slot_count
    for module in model.modules():
        if isinstance(module, layer_class) and any(owner == slot for _, owner in module.blocks):
            module.drop_blocks(slot)  # left by an earlier add that failed
    for module_name, module in list(model.named_modules()):
        update = updates.get(module_name)
        if update is None:
            continue
        if not isinstance(module, layer_class):  # a layer no served adapter adapted yet
            if not isinstance(module, torch.nn.Linear):
                raise TunesmithError(f"could not stack the adapter: it adapts {module_name}, a "
                                     f"{type(module).__name__} layer")
            layer = layer_class(module, rows, module.weight.new_zeros(module.in_features, 0),
                                module.weight.new_zeros(0, module.out_features), ())
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
            module = layer
        module.add_block(*update, slot)
    # Registered last: a failure above leaves blocks no row uses (the slot stays free), dropped when it is reused.
    rows.slot_of[name], rows.slot_count = slot, max(rows.slot_count, slot + 1)
    if slot in rows.unused:
        rows.unused.remove(slot)
    for module in model.modules():
        if isinstance(module, layer_class):
            module._per_slot = None  # the slot count may have grown


def remove_stacked_adapter(model, rows: AdapterRows, name: str) -> None:
    """Drop an adapter's blocks; its slot is reused by the next adapter added. Call it once no row uses the adapter."""
    layer_class = multi_lora_layer_class()
    slot = rows.slot_of.pop(name)
    for module in model.modules():
        if isinstance(module, layer_class):
            module.drop_blocks(slot)
    if slot == rows.free_slot:  # the merged version: its update stays in the base weights, the undo blocks serve all
        rows.free_slot = -1
    rows.unused.append(slot)


def _low_rank_update(module, adapter: str):
    """(A as [in, r], B as [r, out] with the scale folded in) of one adapter on one peft LoRA layer."""
    a, b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()  # [r, in], [out, r]
    return a.t().float(), (b.t() * module.scaling[adapter]).float()
