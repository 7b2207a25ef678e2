"""Linear layers on oneDNN-packed weights while a model generates on CPU in fp32.

A decode step multiplies a few dozen rows by every weight matrix; MKL's sgemm, which `nn.Linear` calls, is slow at
that shape, while oneDNN with its weights reordered once into its own blocked layout is 1.3-1.7x faster at 1-32 rows
on the 2-core AVX2 machine we measure on (the same op torch.compile's CPU backend emits for frozen weights). Only the
packed copy is kept where nothing else reads the dense weight: `unpack` restores the dense weight exactly (the
reorder is lossless), so a model evaluated mid-pipeline trains on afterwards as if nothing happened.
"""

from __future__ import annotations

from functools import cache

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


def can_pack(model) -> bool:
    import torch

    weight = next(model.parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack(model) -> int:
    """Make every plain linear layer of `model` (fp32, on CPU) multiply through packed weights; the number packed.
    A layer's dense weight is released unless another module shares it (tied embeddings) or it belongs to a peft
    layer (DoRA and merging read the weights)."""
    import torch

    if not can_pack(model):
        return 0
    layer_class = packed_linear_class()
    shared = _shared_parameters(model)
    wrapped = _inside_peft_layers(model)
    packed = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not torch.nn.Linear or min(module.in_features, module.out_features) < MIN_FEATURES:
                continue
            try:
                module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
            except RuntimeError:  # a build or CPU oneDNN cannot serve: that layer stays as it was
                continue
            module.__class__ = layer_class
            module.released = id(module.weight) not in shared and id(module) not in wrapped
            if module.released:
                module.weight.data = module.weight.data.new_empty(0)
            packed += 1
    return packed


def unpack(model) -> None:
    """Undo `pack`: every packed layer is a plain nn.Linear again with its dense weight, bit for bit."""
    import torch

    layer_class = packed_linear_class()
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not layer_class:
                continue
            if module.released:
                module.weight.data = module.packed_weight.to_dense()
            del module.packed_weight, module.released
            module.__class__ = torch.nn.Linear


def _shared_parameters(model) -> set[int]:
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
