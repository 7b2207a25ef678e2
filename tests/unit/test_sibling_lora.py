"""Adapted sibling layers share one product (base weights and every adapter's A), hold the base weights once, and
give them back bit for bit."""

from __future__ import annotations

import pytest

from tunesmith.generation.multi_lora import multi_lora_layer_class
from tunesmith.generation.sibling_lora import group_siblings, ungroup_siblings
from tunesmith.serve.engine import ServingEngine


@pytest.fixture(scope="module")
def group(two_versions):
    engine = ServingEngine.from_references([str(run) for run in two_versions], default_max_tokens=8)
    return engine, engine.models["alpha"].route.group


def _logits(group, names, ids):
    group.adapter_rows.select(names, ids.device)
    return group.model(input_ids=ids).logits


def test_siblings_share_one_product_and_hold_the_base_weights_once(group):
    import torch

    engine, group = group
    layers = [module for module in group.model.modules() if isinstance(module, multi_lora_layer_class())]
    attention, mlp = group.model.model.layers[0].self_attn, group.model.model.layers[0].mlp
    assert attention.q_proj.siblings is attention.k_proj.siblings is attention.v_proj.siblings is not None
    assert mlp.gate_proj.siblings is mlp.up_proj.siblings is not mlp.down_proj.siblings
    assert attention.o_proj.siblings.members == [attention.o_proj]
    assert all(layer.base_layer.weight.numel() == 0 for layer in layers)  # the groups hold them
    names = [engine.models["beta"].route.adapter, None, engine.models["alpha"].route.adapter]
    ids = torch.tensor([[5, 6, 7]] * 3)
    with torch.inference_mode():
        grouped = _logits(group, names, ids)
        ungroup_siblings(group.model)
        weights = {name: tensor.clone() for name, tensor in group.model.state_dict().items()}
        alone = _logits(group, names, ids)
        group_siblings(group.model, group.adapter_rows)
        ungroup_siblings(group.model)
        again = group.model.state_dict()
        group_siblings(group.model, group.adapter_rows)
        regrouped = _logits(group, names, ids)
    assert all(tensor.numel() for name, tensor in weights.items() if name.endswith("base_layer.weight"))
    assert all(torch.equal(weights[name], again[name]) for name in weights)  # given back bit for bit
    torch.testing.assert_close(grouped, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(regrouped, grouped, rtol=0, atol=0)


def test_an_adapter_added_and_removed_regroups_the_layers(group):
    import torch

    engine, group = group
    beta = engine.models["beta"].route.adapter
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        before = _logits(group, [beta], ids)
        layers = [module for module in group.model.modules() if isinstance(module, multi_lora_layer_class())]
        updates = {}
        ungroup_siblings(group.model)  # the groups hold the layers' A and B
        for name, module in group.model.named_modules():
            if isinstance(module, multi_lora_layer_class()):
                columns = [c for c, owner in enumerate(o for w, o in module.blocks for _ in range(w))
                           if owner == group.adapter_rows.slot_of[beta]]
                updates[name] = (module.all_a[:, columns].float(), module.all_b[columns].float())
        group.add_adapter("beta-copy", updates)
        copied = _logits(group, ["beta-copy"], ids)
        mixed = _logits(group, [beta, "beta-copy"], torch.cat([ids, ids]))
        group.remove_adapter("beta-copy")
        after = _logits(group, [beta], ids)
    assert all(layer.siblings is not None for layer in layers)
    torch.testing.assert_close(copied, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed, torch.cat([before, before]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_one_version_on_a_base_stays_ungrouped_until_a_second_one_comes(two_versions):
    """Its rows (merged) are nearly all the traffic: a product widened by the low-rank columns would slow them."""
    import torch

    engine = ServingEngine.from_references([str(two_versions[0])], default_max_tokens=8)
    group = engine.models["alpha"].route.group
    layers = [module for module in group.model.modules() if isinstance(module, multi_lora_layer_class())]
    assert layers and all(layer.siblings is None for layer in layers)
    with torch.inference_mode():
        zero_rank_two = {name: (torch.zeros(layer.all_a.shape[0], 2), torch.zeros(2, layer.all_b.shape[1]))
                         for name, layer in group.model.named_modules() if isinstance(layer, multi_lora_layer_class())}
        group.add_adapter("alpha-copy", zero_rank_two)
    assert all(layer.siblings is not None for layer in layers)
