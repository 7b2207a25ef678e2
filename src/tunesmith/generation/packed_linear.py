"""Linear layers on oneDNN-packed weights while a model generates on CPU in fp32.

A decode step multiplies a few dozen rows by every weight matrix; MKL's sgemm, which `nn.Linear` calls, is slow at
that shape, while oneDNN with its weights reordered once into its own blocked layout is 1.3-1.7x faster at 1-32 rows
on the 2-core AVX2 machine we measure on (the same op torch.compile's CPU backend emits for frozen weights). Only the
packed copy is kept where nothing else reads the dense weight: `unpack` restores the dense weight exactly (the
reorder is lossless), so a model evaluated mid-pipeline trains on afterwards as if nothing happened.

Sibling layers that multiply the same input (an attention's query, key and value projections; an MLP's gate and up
projections) are fused: their weights are packed as one matrix, the first sibling called multiplies once for all and
the others take their slice of that product. One wide product runs faster than several narrow ones (the 192-column
key and value products run at half the rate of the 1536-column ones) and pays the call overhead once. Which layers
share an input is seen, not assumed: one tiny forward pass records what each layer was called with.
"""

from __future__ import annotations

from functools import cache

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
    """The product of one input with several layers' weights stacked (oneDNN-packed), computed once for them all.

    The first member called with an input multiplies it by every member's weight; each other member called with the
    very same tensor, unchanged (inference tensors keep no count of changes: there, the very same tensor), takes its
    slice. Any other call (a different input, a member called twice) multiplies afresh, so every member always
    returns exactly its own product of what it was given."""

    def __init__(self, members: list):
        import torch

        self.sizes = [member.out_features for member in members]
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
            torch.cat([member.weight.detach() for member in members]), None)
        biases = [member.bias for member in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else members[0].weight.new_zeros(size) for b, size in zip(biases, self.sizes)])
        self._input, self._version, self._outputs, self._pending = None, None, (), set()

    def output(self, index: int, x):
        import torch

        if x is self._input and _version(x) == self._version and index in self._pending:
            self._pending.discard(index)
            result = self._outputs[index]
            if not self._pending:
                self._input, self._outputs = None, ()
            return result
        product = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")
        self._outputs = product.split(self.sizes, dim=-1)
        self._input, self._version = x, _version(x)
        self._pending = set(range(len(self.sizes))) - {index}
        return self._outputs[index]

    def dense_weight(self, index: int):
        start = sum(self.sizes[:index])
        return self.packed_weight.to_dense()[start:start + self.sizes[index]].clone()


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
    shared = _shared_parameters(model)
    wrapped = _inside_peft_layers(model)
    candidates = [module for module in model.modules()
                  if type(module) is torch.nn.Linear and min(module.in_features, module.out_features) >= MIN_FEATURES]
    packed = 0
    with torch.no_grad():
        for members in _sharing_one_input(model, candidates):
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
    import torch

    layer_class, member_class = packed_linear_class(), fused_member_class()
    with torch.no_grad():
        for module in model.modules():
            if type(module) is layer_class:
                if module.released:
                    module.weight.data = module.packed_weight.to_dense()
                del module.packed_weight, module.released
            elif type(module) is member_class:
                if module.released:
                    module.weight.data = module.fused.dense_weight(module.fused_index)
                del module.fused, module.fused_index, module.released
            else:
                continue
            module.__class__ = torch.nn.Linear


def _version(tensor) -> int | None:
    """How often `tensor` was changed in place (None for inference tensors, which do not count: changing an input in
    place between sibling projections is something no model we know does)."""
    return None if tensor.is_inference() else tensor._version


def _sharing_one_input(model, candidates: list) -> list[list]:
    """Groups of two or more `candidates` that one forward pass of `model` (two tokens) called with the same input
    tensor, with the same input width and dtype, in the order they were called; none when the pass fails."""
    import torch

    calls: dict[int, list] = {}
    inputs = []  # held until the end, so that no id is reused by a later tensor

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            inputs.append(args[0])
            members = calls.setdefault(id(args[0]), [])
            if module not in members:
                members.append(module)

    hooks = [module.register_forward_pre_hook(record) for module in candidates]
    try:
        ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
        model(input_ids=ids, use_cache=False)
    except Exception:  # a model this call does not fit (not a causal LM): its layers are packed one by one
        return []
    finally:
        for hook in hooks:
            hook.remove()
    groups, taken = [], set()
    for members in calls.values():
        if len(members) > 1 and len({(m.in_features, m.weight.dtype) for m in members}) == 1 \
                and not taken & {id(m) for m in members}:  # a layer called with two shared inputs joins the first
            groups.append(members)
            taken |= {id(m) for m in members}
    return groups


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
