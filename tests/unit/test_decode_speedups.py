"""The decode-step speed-ups under the engine: a KV cache that appends in place, and oneDNN-packed linear layers
(siblings that multiply the same input fused into one product). All must be invisible: the same keys, values and logits as transformers' own path, and the model given back intact."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from tunesmith.generation.growing_cache import ROOM_TOKENS, growing_layer_class
from tunesmith.generation.packed_linear import (FusedProduct, can_pack, fused_member_class, pack, packed_linear_class,
                                                unpack)
from tunesmith.models import load_model


def states(rows: int, tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2, tokens, 8, generator=generator),
            torch.randn(rows, 2, tokens, 8, generator=generator))


def test_growing_layer_holds_what_a_dynamic_layer_holds_through_appends_leaves_and_trims():
    growing, reference = growing_layer_class()(), DynamicLayer()
    for layer in (growing, reference):
        layer.update(*states(4, 5, seed=0))
    buffer = growing._buffers[0]
    for step in range(ROOM_TOKENS + 6):  # past the room: one copy into a bigger buffer on the way
        new = states(4 if step < 10 else 2, 1, seed=step + 1)
        for layer in (growing, reference):
            keys, values = layer.update(*new)
        assert torch.equal(keys, reference.keys) and torch.equal(values, reference.values)
        if step == 3:
            assert growing._buffers[0] is buffer, "a token that fits was written in place"
        if step == 9:  # rows 1 and 3 leave, row 3 twice (a prompt with n choices)
            for layer in (growing, reference):
                layer.batch_select_indices(torch.tensor([3, 1]))
        if step == 12:
            growing.drop_front(2)
            reference.keys, reference.values = reference.keys[:, :, 2:], reference.values[:, :, 2:]
    assert torch.equal(growing.keys, reference.keys) and torch.equal(growing.values, reference.values)


def test_a_view_handed_out_is_never_written_afterwards():
    """The prefix cache keeps a prompt's keys as views; later tokens of the same row must not land inside them."""
    layer = growing_layer_class()()
    layer.update(*states(1, 6, seed=0))
    kept_keys = layer.keys
    snapshot = kept_keys.clone()
    layer.keys = kept_keys[:, :, :4]  # someone trims by assignment: the next append must not reuse the buffer
    layer.values = layer.values[:, :, :4]
    layer.update(*states(1, 1, seed=1))
    layer.update(*states(1, 1, seed=2))
    assert torch.equal(kept_keys, snapshot)
    assert layer.get_seq_length() == 6


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_packed_model_gives_the_same_logits_and_unpack_restores_every_weight_bit_for_bit(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert can_pack(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.tensor([[5, 9, 13, 2, 7], [3, 3, 8, 1, 4]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    packed = pack(model)
    layer_class, member_class = packed_linear_class(), fused_member_class()
    linears = [m for m in model.modules() if type(m) in (layer_class, member_class)]
    assert packed == len(linears) > 0
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.q_proj.fused is attention.k_proj.fused is attention.v_proj.fused, "q, k, v: one product"
    assert mlp.gate_proj.fused is mlp.up_proj.fused is not attention.q_proj.fused
    assert type(attention.o_proj) is layer_class and type(mlp.down_proj) is layer_class, "their inputs are their own"
    released = [m for m in linears if m.released]
    assert released and all(m.weight.numel() == 0 for m in released), "packed layers keep one copy of the weight"
    head = model.get_output_embeddings()
    assert head.weight.numel() > 0, "the tied head's weight is the embedding's: never released"
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    unpack(model)
    assert not any(type(m) in (layer_class, member_class) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # the model trains afterwards as if it had never been packed
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_a_fused_member_always_returns_its_own_product_of_what_it_was_given():
    generator = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(32, size, bias=bias) for size, bias in ((32, True), (16, False), (24, True))]
    fused = FusedProduct(layers)
    x, y = torch.randn(3, 32, generator=generator), torch.randn(3, 32, generator=generator)

    def check(index, tensor):
        torch.testing.assert_close(fused.output(index, tensor), layers[index](tensor), atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        check(0, x), check(1, x), check(2, x)  # the usual order: one product, slices of it
        check(0, x), check(0, x)  # a member called twice with one input
        check(1, y)  # a different input than the one multiplied
        check(2, x)
        x.mul_(2)  # the same tensor, changed in place: multiplied afresh
        check(0, x), check(2, x)


def test_peft_layers_keep_their_dense_weights_while_packed(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=16, target_modules=["q_proj", "down_proj"],
                                                                  use_dora=True, init_lora_weights=False))
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        pack(model)
        got = model(input_ids=ids).logits  # DoRA reads its base weight in every forward
    unpack(model)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_stacked_rows_are_right_aligned_behind_zeros_and_keep_appending_in_place():
    layer = growing_layer_class()()
    long, short = states(2, 7, seed=0), states(1, 3, seed=1)
    layer.update(*long)
    layer.stack_rows([(layer.keys, layer.values), short, None], width=7)
    expected_keys = torch.cat([long[0], torch.nn.functional.pad(short[0], (0, 0, 4, 0)), torch.zeros(1, 2, 7, 8)])
    assert torch.equal(layer.keys, expected_keys)
    buffer = layer._buffers[0]
    new = states(4, 1, seed=2)
    keys, _ = layer.update(*new)
    assert layer._buffers[0] is buffer and torch.equal(keys[:, :, -1:], new[0])


def test_rows_join_into_free_rows_and_leaving_rows_are_replaced_by_the_last_ones():
    layer = growing_layer_class()()
    layer.stack_rows([states(3, 6, seed=0)], width=6)
    buffer = layer._buffers[0]
    joining = states(2, 4, seed=1)
    layer.append_rows(*joining)
    assert layer._buffers[0] is buffer, "room for the joining rows: no copy of the rows held"
    assert torch.equal(layer.keys[3:, :, 2:], joining[0]) and not layer.keys[3:, :, :2].any()
    before = layer.keys.clone()
    layer.move_rows([0, 4, 2, 3])  # row 1 left: the last row takes its place
    assert layer._buffers[0] is buffer
    assert torch.equal(layer.keys, before[[0, 4, 2, 3]])


def test_padded_batch_remove_returns_the_order_its_rows_now_have(tiny_model_dir):
    from tunesmith.generation.padded_batch import PaddedBatch, new_cache

    model = load_model(tiny_model_dir)
    caches = []
    for length in (5, 3, 4, 2, 6):
        cache = new_cache(model)
        for layer in cache.layers:
            layer.update(*states(1, length, seed=length))
        caches.append(cache)
    batch = PaddedBatch.of_prefixes(model, caches, [5, 3, 4, 2, 6])
    keys_before, mask_before = batch.cache.layers[0].keys.clone(), batch.mask.clone()
    order = batch.remove([1, 3])
    assert sorted(order) == [0, 2, 4] and order[0] == 0 and order[2] == 2
    width = batch.mask.shape[1]
    assert torch.equal(batch.cache.layers[0].keys, keys_before[order][:, :, -width:])
    assert torch.equal(batch.mask, mask_before[order][:, -width:])
