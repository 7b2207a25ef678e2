"""Adapted sibling layers (same input: q/k/v, gate/up) computed together, base weights and low-rank updates at once.

Each `MultiLoraLinear` alone costs its base product plus two small products per pass (its A, then its B), and on
CPU a small product costs far more than its size says (some tens of microseconds per call): with 4 adapters mixed,
those calls took about as long as the base model's own layers. Siblings therefore share one `SiblingProducts`:
their base weights and all their A stacked in one product, the per-row mask, their B block-diagonal in one product
laid out like the base outputs, one addition, and each member takes its slice. A layer without siblings gets the
same for itself alone (called directly: with one member there is nothing to share). The update is added in place
into the product's own output. Passes whose rows all use the merged version skip the mask and B, but not the wider
product: with a single version on the base (its rows the bulk of the traffic, merged) the layers stay ungrouped
(grouped, that case decoded ~8% slower: 211-219 vs 227-243 tok/s in process).

The group holds the base weights and the adapters' A and B (oneDNN-packed on CPU, stacked elsewhere) instead of the
layers, which get them back when the group is dissolved (`ungroup_siblings`, before adapters are added or removed).
"""

from __future__ import annotations

from tunesmith.generation.multi_lora import AdapterRows, multi_lora_layer_class
from tunesmith.generation.packed_linear import (
    MatrixProduct,
    can_pack,
    shared_parameters,
    stacked_weight_and_bias,
    unpack_layer,
)
from tunesmith.generation.shared_input import OncePerInput, layers_sharing_one_input


class SiblingProducts:
    """Outputs of `members` (MultiLoraLinear layers called with one input) for the rows of a pass."""

    def __init__(self, members: list, rows: AdapterRows, packable: bool, shared: set[int]):
        import torch

        self.rows, self.members = rows, members
        bases = [member.base_layer for member in members]
        self.sizes = [base.out_features for base in bases]
        self.base_width = sum(self.sizes)
        self.blocks = tuple(block for member in members for block in member.blocks)
        with torch.no_grad():
            low_rank_down = torch.cat([member.all_a.t() for member in members])
            self.product = MatrixProduct(*stacked_weight_and_bias(bases, low_rank_down), packable=packable)
            self.up = MatrixProduct(torch.block_diag(*[member.all_b for member in members]).t(), packable=packable)
            self.released = [id(base.weight) not in shared for base in bases]
            for base, released in zip(bases, self.released):
                if released:  # the group holds it now
                    base.weight.data = base.weight.data.new_empty(0)
            self.low_rank_shapes = [(member.all_a.shape, member.all_b.shape) for member in members]
            for member in members:  # and their A and B
                member.all_a, member.all_b = member.all_a.new_empty(0), member.all_b.new_empty(0)
        self.once = OncePerInput(self._outputs, len(members))
        self.alone = len(members) == 1

    def output(self, index: int, x):
        return self._sum(x) if self.alone else self.once.output(index, x)

    def _outputs(self, x) -> tuple:
        return self._sum(x).split(self.sizes, dim=-1)

    def _sum(self, x):
        """Every member's output side by side: base product plus each row's low-rank update."""
        full = self.product(x)
        outputs = full[..., :self.base_width]
        if self.rows.uniform != self.rows.free_slot and self.blocks:
            mask = self.rows.columns_mask(self.blocks, x.dtype)
            outputs.add_(self.up(full[..., self.base_width:] * mask))  # in place: `full` is this call's own
        return outputs

    def dissolve(self) -> None:
        """Give the base layers their weights back and let every member compute alone again."""
        import torch

        with torch.no_grad():
            dense, up = self.product.dense(), self.up.dense().t()
            base_start, column, out_start = 0, self.base_width, 0
            for member, size, released, (a_shape, b_shape) in zip(self.members, self.sizes, self.released,
                                                                   self.low_rank_shapes):
                if released:
                    member.base_layer.weight.data = dense[base_start:base_start + size].clone()
                columns = a_shape[1]
                member.all_a = dense[column:column + columns].t().contiguous()
                member.all_b = up[column - self.base_width:column - self.base_width + columns,
                                  out_start:out_start + b_shape[1]].contiguous()
                member.siblings = None
                base_start, column, out_start = base_start + size, column + columns, out_start + b_shape[1]
        self.once.forget()


def group_siblings(model, rows: AdapterRows) -> int:
    """Give every adapted layer of a stacked model whose update is a dense product its `SiblingProducts` (shared with
    the layers called with the same input); the number of groups. Call it again whenever a layer's A or B changed."""
    import torch

    layer_class = multi_lora_layer_class()
    ungroup_siblings(model)
    if len(rows.slot_of) < 2:  # one version: only base rows need an update, and the wider product slows every pass
        return 0
    dense = [module for module in model.modules() if isinstance(module, layer_class) and module.dense_mix]
    if not dense:
        return 0
    for layer in dense:
        unpack_layer(layer.base_layer)  # a layer packed on its own before an adapter reached it
    dense = [layer for layer in dense if type(layer.base_layer) is torch.nn.Linear and layer.base_layer.weight.numel()]
    rows.select([None], next(model.parameters()).device)  # the calibration pass below must not mix rows
    groups = layers_sharing_one_input(model, dense, kind=lambda layer: (layer.all_a.shape[0], layer.all_a.dtype))
    grouped = {id(layer) for members in groups for layer in members}
    groups += [[layer] for layer in dense if id(layer) not in grouped]
    packable, shared = can_pack(model), shared_parameters(model)
    for members in groups:
        products = SiblingProducts(members, rows, packable, shared)
        for index, layer in enumerate(members):
            layer.siblings, layer.sibling_index = products, index
    return len(groups)


def ungroup_siblings(model) -> None:
    """Every adapted layer computes its own product and update again, on its own base weights."""
    layer_class = multi_lora_layer_class()
    groups = {id(module.siblings): module.siblings for module in model.modules()
              if isinstance(module, layer_class) and module.siblings is not None}
    for products in groups.values():
        products.dissolve()
