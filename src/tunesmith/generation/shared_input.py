"""Layers that multiply the same input, found by watching one tiny forward pass, and results computed once for them.

An attention's query, key and value projections (an MLP's gate and up projections) are called one after the other
with the very same tensor. Computing all their products in one call is faster than one call each (each call into
the CPU kernels costs some tens of microseconds whatever its size), so `packed_linear` fuses their weights and
`sibling_lora` their low-rank updates. Which layers share an input is seen, not assumed from their names.
"""

from __future__ import annotations

from typing import Callable, Hashable


def layers_sharing_one_input(model, candidates: list, kind: Callable[[object], Hashable]) -> list[list]:
    """Groups of two or more `candidates` that one forward pass of `model` (two tokens) called with the same input
    tensor and that have the same `kind`, in the order they were called; none when the pass fails."""
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
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception:  # a model this call does not fit (not a causal LM): no layer is grouped
        return []
    finally:
        for hook in hooks:
            hook.remove()
    groups, taken = [], set()
    for members in calls.values():
        if len(members) > 1 and len({kind(m) for m in members}) == 1 \
                and not taken & {id(m) for m in members}:  # a layer called with two shared inputs joins the first
            groups.append(members)
            taken |= {id(m) for m in members}
    return groups


class OncePerInput:
    """Outputs for several members computed by one call for one input, each handed out once.

    The first member asking with an input computes every member's output; each other member asking with the very
    same tensor, unchanged (inference tensors keep no count of changes: there, the very same tensor), takes its own.
    Any other request (a different input, a member asking twice) computes afresh, so every member always gets exactly
    its output for what it was given."""

    def __init__(self, compute: Callable[[object], tuple], members: int):
        self.compute, self.members = compute, members
        self._input, self._version, self._outputs, self._pending = None, None, (), set()

    def output(self, index: int, x):
        if x is self._input and _version(x) == self._version and index in self._pending:
            self._pending.discard(index)
            result = self._outputs[index]
            if not self._pending:
                self.forget()
            return result
        self._outputs = self.compute(x)
        self._input, self._version = x, _version(x)
        self._pending = set(range(self.members)) - {index}
        return self._outputs[index]

    def forget(self) -> None:
        """Let go of the held outputs (members that did not ask for theirs would keep them alive)."""
        self._input, self._outputs, self._pending = None, (), set()


def _version(tensor) -> int | None:
    """How often `tensor` was changed in place (None for inference tensors, which do not count: changing an input in
    place between sibling projections is something no model we know does)."""
    return None if tensor.is_inference() else tensor._version
