"""A faster forward for peft's LoRA linear layers while training: the scaling is applied on the rank-r side.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`, a pass over every adapted layer's full-width output (and
another in backward) just to multiply by a constant. `base(x) + lora_B(lora_A(x) * scaling)` is the same sum
with the multiplication done on r (16) columns instead of up to 1,536: 5% faster CPU training steps on the
default model (interleaved runs, median step 0.875-0.922 s vs 0.938-0.972 s). Anything beyond a plain single
LoRA (DoRA and other variants, a LoRA bias, merged or disabled adapters, several active adapters, extra
arguments) goes to peft's own forward.
"""

from __future__ import annotations

import functools

@functools.cache
def _fast_class():
    from peft.tuners.lora.layer import Linear

    class RankSideScaledLoraLinear(Linear):
        def forward(self, x, *args, **kwargs):
            names = self.active_adapters
            if args or kwargs or self.disable_adapters or self.merged or len(names) != 1:
                return super().forward(x, *args, **kwargs)
            name = names[0]
            if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
                return super().forward(x, *args, **kwargs)  # a LoRA bias is scaled too: not the same sum
            result = self.base_layer(x)
            lora_input = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)  # as peft (off under autocast)
            down = self.lora_A[name](self.lora_dropout[name](lora_input))
            return (result + self.lora_B[name](down * self.scaling[name])).to(result.dtype)

    return RankSideScaledLoraLinear


def scale_lora_on_rank_side(model) -> int:
    """Give every plain peft LoRA linear layer of `model` the faster forward; returns how many changed.

    Only the forward changes: parameters, their names and the saved adapter are exactly peft's.
    """
    from peft.tuners.lora.layer import Linear

    fast, count = _fast_class(), 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = fast
            count += 1
    return count
