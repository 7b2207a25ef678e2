"""Linear layers on oneDNN-packed weights while a model generates on CPU in fp32.

A decode step multiplies a few dozen rows by every weight matrix; MKL's sgemm, which `nn.Linear` calls, is slow at
that shape, while oneDNN with its weights reordered once into its own blocked layout is 1.3-1.7x faster at 1-32 rows
on the 2-core AVX2 machine we measure on (the same op torch.compile's CPU backend emits for frozen weights). Only the
packed copy is kept where nothing else reads the dense weight: `unpack` restores the dense weight exactly (the
reorder is lossless), so a model evaluated mid-pipeline trains on afterwards as if nothing happened.

Sibling layers that multiply the same input (an attention's query, key and value projections; an MLP's gate and up
projections) are fused: their weights are packed as one matrix, the first sibling called multiplies once for all and
the others take their slice of that product. One wide product runs faster than several narrow ones (the 192-column
key and value products run at half the rate of the 1536-column ones) and pays the call overhead once (see
`shared_input`).
"""

from __future__ import annotations

from functools import cache

from tunesmith.generation.shared_input import OncePerInput, layers_sharing_one_input
from tunesmith.machine import cpu_supports_bf16

MIN_FEATURES = 16
"""Thinner layers (a low-rank adapter's A and B at small ranks) gain nothing from packing."""


@cache  # one class, so that isinstance finds every packed layer
def packed_linear_class():
    import torch

    class PackedLinear(torch.nn.Linear):
        """An nn.Linear whose forward multiplies by `packed_weight`, a oneDNN-reordered copy of its weight."""

        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    return PackedLinear


@cache
def fused_member_class():
    import torch

    class FusedMemberLinear(torch.nn.Linear):
        """An nn.Linear whose product comes from `fused`, the product of its input with it and its siblings."""

        def forward(self, x):
            return self.fused.output(self.fused_index, x)

    return FusedMemberLinear


class FusedProduct:
    """The product of one input with several layers' weights stacked (oneDNN-packed), computed once for them all
    (see `shared_input.OncePerInput`: a member called with anything else multiplies afresh)."""

    def __init__(self, members: list):
        self.sizes = [member.out_features for member in members]
        self.product = MatrixProduct(*stacked_weight_and_bias(members), packable=True)
        if self.product.packed_weight is None:
            raise RuntimeError("oneDNN cannot pack these weights")
        self.once = OncePerInput(self._products, len(members))

    def output(self, index: int, x):
        return self.once.output(index, x)

    def _products(self, x) -> tuple:
        return self.product(x).split(self.sizes, dim=-1)

    def dense_weight(self, index: int):
        start = sum(self.sizes[:index])
        return self.product.dense()[start:start + self.sizes[index]].clone()


def stacked_weight_and_bias(layers: list, extra_rows=None):
    """The layers' weights stacked ([sum of out, in]), then `extra_rows` if given; their biases stacked the same way
    (zeros for layers without one and for the extra rows), or None when no layer has a bias."""
    import torch

    weights = [layer.weight.detach() for layer in layers] + ([extra_rows] if extra_rows is not None else [])
    weight = torch.cat(weights)
    if all(layer.bias is None for layer in layers):
        return weight, None
    biases = [layer.bias.detach() if layer.bias is not None else weight.new_zeros(layer.out_features)
              for layer in layers]
    return weight, torch.cat(biases + [weight.new_zeros(weight.shape[0] - sum(b.shape[0] for b in biases))])


class MatrixProduct:
    """x @ weight.T (+ bias) for a [out, in] weight: through oneDNN's packed layout where `packable` and oneDNN
    accepts the weight, else a plain product (CUDA, fp16, a build without oneDNN)."""

    def __init__(self, weight, bias=None, packable: bool = True):
        import torch

        self.weight, self.bias, self.packed_weight = weight.contiguous(), bias, None
        if packable:
            try:
                self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
                self.weight = None
            except RuntimeError:
                pass

    def __call__(self, x):
        import torch

        if self.packed_weight is None:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    def dense(self):
        """The [out, in] weight, bit for bit."""
        return self.weight if self.packed_weight is None else self.packed_weight.to_dense()


def can_pack(model) -> bool:
    import torch

    weight = next(model.parameters())
    dtypes = (torch.float32, torch.bfloat16) if cpu_supports_bf16() else (torch.float32,)
    return weight.device.type == "cpu" and weight.dtype in dtypes and torch.backends.mkldnn.is_available()


def pack(model) -> int:
    """Make every plain linear layer of `model` (fp32, on CPU) multiply through packed weights; the number packed.
    A layer's dense weight is released unless another module shares it (tied embeddings) or it belongs to a peft
    layer (DoRA and merging read the weights)."""
    import torch

    if not can_pack(model):
        return 0
    layer_class, member_class = packed_linear_class(), fused_member_class()
    shared = shared_parameters(model)
    wrapped = _inside_peft_layers(model)
    candidates = [module for module in model.modules()  # an empty weight: its layer's product is computed elsewhere
                  if type(module) is torch.nn.Linear and min(module.in_features, module.out_features) >= MIN_FEATURES
                  and module.weight.numel()]
    packed = 0
    with torch.no_grad():
        for members in layers_sharing_one_input(model, candidates, kind=lambda m: (m.in_features, m.weight.dtype)):
            try:
                fused = FusedProduct(members)
            except RuntimeError:  # oneDNN cannot serve it: the members are packed one by one below
                continue
            for index, module in enumerate(members):
                module.fused, module.fused_index = fused, index
                module.__class__ = member_class
                _release(module, shared, wrapped)
                packed += 1
        for module in candidates:
            if type(module) is not torch.nn.Linear:
                continue
            try:
                module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
            except RuntimeError:  # a build or CPU oneDNN cannot serve: that layer stays as it was
                continue
            module.__class__ = layer_class
            _release(module, shared, wrapped)
            packed += 1
    return packed


def _release(module, shared: set[int], wrapped: set[int]) -> None:
    """Drop the dense weight of a packed layer unless another module shares it or peft reads it."""
    module.released = id(module.weight) not in shared and id(module) not in wrapped
    if module.released:
        module.weight.data = module.weight.data.new_empty(0)


def unpack(model) -> None:
    """Undo `pack`: every packed layer is a plain nn.Linear again with its dense weight, bit for bit."""
    for module in model.modules():
        unpack_layer(module)


def unpack_layer(module) -> None:
    """Make one layer packed by `pack` a plain nn.Linear again with its dense weight; other modules are left as
    they are."""
    import torch

    layer_class, member_class = packed_linear_class(), fused_member_class()
    with torch.no_grad():
        if type(module) is layer_class:
            if module.released:
                module.weight.data = module.packed_weight.to_dense()
            del module.packed_weight, module.released
        elif type(module) is member_class:
            if module.released:
                module.weight.data = module.fused.dense_weight(module.fused_index)
            del module.fused, module.fused_index, module.released
        else:
            return
        module.__class__ = torch.nn.Linear


def shared_parameters(model) -> set[int]:
    """ids of parameters that more than one module holds."""
    seen, shared = set(), set()
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is None:
                continue
            (shared if id(parameter) in seen else seen).add(id(parameter))
    return shared


def _inside_peft_layers(model) -> set[int]:
    """ids of the modules inside peft's LoRA layers (their base layer, A and B)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return set()
    return {id(inner) for module in model.modules() if isinstance(module, LoraLayer) for inner in module.modules()}
