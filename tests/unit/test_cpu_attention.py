"""tunesmith's CPU training attention gives the model's own attention results: padded, packed, in bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.template import IGNORE_INDEX, TokenizedExample
from tunesmith.models import load_model
from tunesmith.train.batches import padded_batch, padding_free_batch
from tunesmith.train.cpu_attention import NAME, use_cpu_attention
from tunesmith.train.loop import trained_token_loss_module


def _examples() -> list[TokenizedExample]:
    torch.manual_seed(2)
    examples = []
    for length in (11, 23, 6, 15):
        ids = torch.randint(3, 300, (length,)).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * 3 + ids[3:]))
    return examples


def _loss_and_grad(model, batch, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = trained_token_loss_module(model)(**batch)
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    return loss.item(), grad


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_gemm_attention_matches_the_models_own_attention(tiny_model_dir, packed, autocast):
    reference, ours = load_model(tiny_model_dir), load_model(tiny_model_dir)
    assert reference.config.num_key_value_heads < reference.config.num_attention_heads  # grouped-query attention
    assert use_cpu_attention(ours) and ours.config._attn_implementation == NAME
    for model in (reference, ours):
        model.config.use_cache = False
    examples = _examples()
    batch = padding_free_batch(examples) if packed else padded_batch(examples, pad_token_id=0)
    loss_ref, grad_ref = _loss_and_grad(reference, batch, autocast)
    loss_ours, grad_ours = _loss_and_grad(ours, batch, autocast)
    tolerance = 2e-2 if autocast else 1e-5
    assert loss_ours == pytest.approx(loss_ref, rel=tolerance)
    assert (grad_ours - grad_ref).norm() <= tolerance * 10 * grad_ref.norm()


def test_long_sequences_go_to_sdpa_which_keeps_no_score_matrix(tiny_model_dir, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tunesmith.train import cpu_attention

    sdpa, calls = ALL_ATTENTION_FUNCTIONS["sdpa"], []
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    model = load_model(tiny_model_dir)
    model.config.use_cache = False
    use_cpu_attention(model)
    batch = padded_batch(_examples(), pad_token_id=0)
    loss = trained_token_loss_module(model)
    with torch.no_grad():
        short = loss(**batch).item()
        assert not calls
        monkeypatch.setattr(cpu_attention, "MAX_SCORES", 0)
        long = loss(**batch).item()
    assert len(calls) == model.config.num_hidden_layers and long == pytest.approx(short, rel=1e-5)
