"""The rank-side-scaled LoRA forward computes peft's outputs and gradients, and leaves the saved adapter alone."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from tunesmith.train.lora_fast_path import scale_lora_on_rank_side


def _twins(**lora):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20, bias=False), torch.nn.SiLU(), torch.nn.Linear(20, 12))
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["0", "2"], **lora)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)  # peft starts B at zero, which would hide a wrong scaling
    ours = copy.deepcopy(peft_model)
    return peft_model, ours


def _output_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_outputs_and_gradients_equal_peft():
    reference, ours = _twins()
    assert scale_lora_on_rank_side(ours) == 2
    x = torch.randn(3, 5, 12)
    expected, expected_grads = _output_and_grads(reference, x)
    got, grads = _output_and_grads(ours, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)
    assert ours.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "lora-bias"])
def test_anything_but_plain_lora_keeps_peft_forward(lora):
    reference, ours = _twins(**lora)
    scale_lora_on_rank_side(ours)
    x = torch.randn(2, 12)
    torch.testing.assert_close(ours(x), reference(x))


def test_disabled_adapter_gives_the_base_model():
    reference, ours = _twins()
    scale_lora_on_rank_side(ours)
    x = torch.randn(2, 12)
    with ours.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(ours(x), reference(x))
    assert not torch.allclose(ours(x), ours.get_base_model()[2].base_layer(
        torch.nn.functional.silu(ours.get_base_model()[0].base_layer(x))))
    assert all(type(m) is not PeftLoraLinear for m in ours.modules())
