"""The fused, chunked vocabulary projection + cross-entropy gives the plain path's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from tunesmith.train import head_loss
from tunesmith.train.head_loss import HeadWorkspace, linear_cross_entropy
from tunesmith.train.loop import plain_vocabulary_projection, trained_token_loss_module


def _plain(hidden, weight, targets, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, weight).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-head", "trained-head"])
def test_loss_and_gradients_match_the_plain_path_across_chunks(monkeypatch, dtype, train_weight):
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * 300 * 5)  # 16 rows a chunk: 37 rows take three chunks
    torch.manual_seed(0)
    hidden = torch.randn(37, 24, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(300, 24) * 0.3, requires_grad=train_weight)
    targets = torch.randint(0, 300, (37,))
    upstream = 0.37  # the loop scales the summed loss by 1 / trained tokens before backward
    expected = _plain(hidden, weight, targets, dtype)
    (expected * upstream).backward()
    expected_grads = [hidden.grad.clone()] + ([weight.grad.clone()] if train_weight else [])
    hidden.grad, weight.grad = None, None

    workspace = HeadWorkspace()  # buffers kept from a smaller micro-batch must not leak into the next
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        linear_cross_entropy(hidden[:7].detach(), weight.detach(), targets[:7], workspace)
        loss = linear_cross_entropy(hidden, weight, targets, workspace)
    (loss * upstream).backward()
    grads = [hidden.grad] + ([weight.grad] if train_weight else [])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance)
    for ours, reference in zip(grads, expected_grads):
        assert (ours - reference).norm() <= tolerance * reference.norm()


def test_no_gradients_are_computed_without_autograd():
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(40, 8)
    targets = torch.randint(0, 40, (5,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, HeadWorkspace())
    assert loss.grad_fn is None and loss.item() == pytest.approx(_plain(hidden, weight, targets, torch.float32).item())


def test_a_frozen_heads_cast_is_kept_until_the_weight_changes():
    workspace, weight = HeadWorkspace(), torch.randn(40, 8)
    first = workspace.weight(weight, torch.bfloat16)
    assert workspace.weight(weight, torch.bfloat16) is first  # no re-cast on the next micro-batch
    weight.add_(1.0)  # e.g. best weights restored into the same tensor
    assert torch.equal(workspace.weight(weight, torch.bfloat16), weight.to(torch.bfloat16))


def test_models_that_change_their_logits_after_the_projection_train_on_their_own_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**small))
    capped = Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=0.5))
    assert plain_vocabulary_projection(plain) and not plain_vocabulary_projection(capped)
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    for model in (plain, capped):
        model.config.use_cache = False
        logits = model(input_ids=ids).logits[:, :-1].reshape(-1, 64)
        expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum")
        loss = trained_token_loss_module(model)(input_ids=ids, labels=labels)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_micro_batch_with_no_trained_token_gives_zero_loss_and_zero_gradients():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(40, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), HeadWorkspace())
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8) and not weight.grad.any()
