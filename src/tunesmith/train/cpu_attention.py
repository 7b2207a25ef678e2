"""Attention for training on CPU: grouped-query attention as two batched GEMMs, registered with transformers.

On short sequences PyTorch's CPU SDPA kernel is slow in bf16: on the default model (9 heads, 3 KV heads,
~130 tokens, batch 8) its forward + backward took ~26 ms per layer, about 40% of a training step, while the
same attention as bf16 matmuls with an fp32 softmax takes a fraction of that. Query heads that share a KV head
are folded into one matrix, so keys and values are never copied per head (transformers' eager path repeats
them). Masks come from transformers' own `eager_mask` (causal, padding, packed sequences, sliding windows), so
the result is the model's attention; anything this path does not cover (logit soft-capping, attention sinks)
goes to SDPA, and so do long sequences, whose scores would take too much memory.
"""

from __future__ import annotations

NAME = "tunesmith_cpu"
# Scores kept for the backward pass cost ~6 bytes each (fp32 softmax output + bf16 copy). Up to the default model
# at batch 8 x 256 tokens (~28 MB a layer) the GEMMs win; longer sequences go to SDPA, which keeps no scores.
MAX_SCORES = 8 * 9 * 256 * 256


def grouped_gemm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query (B, H, L, D), key/value (B, KV, S, D) -> output (B, L, H, D)."""
    import torch

    too_long = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] > MAX_SCORES
    if too_long or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    batch, heads, length, width = query.shape
    kv_heads, source = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, group * length, width), key.transpose(-1, -2))
    scores = scores.view(batch, kv_heads, group, length, source) * (width ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, :source]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    output = torch.matmul(probs.view(batch, kv_heads, group * length, source), value)
    return output.view(batch, heads, length, width).transpose(1, 2).contiguous(), None


def use_cpu_attention(model) -> bool:
    """Switch a model being trained on CPU to the GEMM attention; False when its attention cannot switch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_gemm_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError):  # an architecture that only supports its own attention
        return False
    return True
