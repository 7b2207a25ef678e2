"""Decode steps that also prefill: the running rows' next tokens and new prompts' tokens in one forward pass.

On CPU a decode step at batch 16 is bound by memory: it streams every weight of the model once (about 20 ms on the
default model), and a prefill pass of a few short prompts streams them all again for about as long. Requests arrive
while others decode, so a server spent close to a third of its time in such separate prefill passes. Here a step's
tokens are laid end to end as one sequence ([1, rows + prompt tokens], each token at its own position): every
linear layer multiplies them together, and only attention tells them apart. A registered attention function
(transformers' AttentionInterface) gives each decode row its cached keys (the padded batch's) and each prompt its own
(causal, after any prefix it holds), as vLLM's chunked prefill does; outside such a step it is plain SDPA.

Whether a model's attention goes through that interface is seen, not assumed: a calibration pass must give the
logits of separate passes, else the model keeps separate passes (`enable_fused_steps`).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

ATTENTION = "tunesmith_sdpa"
"""The attention implementation a model whose steps can be fused runs with: SDPA, fused while a step is."""

_current_step: contextvars.ContextVar = contextvars.ContextVar("tunesmith_fused_step", default=None)


@dataclass
class Segment:
    """A prompt's tokens in a fused step: `length` of them, after the `done` its single-row `cache` holds."""

    cache: object
    done: int
    length: int


class FusedStep:
    """The first `rows` tokens are one new token per running row (whose keys are in `batch_cache`, whose padding
    `batch_mask` [rows, width] marks, None when there is none); the `segments` follow, in order."""

    def __init__(self, rows: int, batch_cache, batch_mask, segments: list[Segment]):
        self.rows, self.batch_cache, self.segments = rows, batch_cache, segments
        self.batch_mask = None if batch_mask is None else batch_mask.bool()[:, None, None, :]

    def attend(self, module, query, key, value, scaling):
        """Attention output [1, tokens, heads, dim] for query/key/value [1, heads, tokens, dim] of one layer."""
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer, parts = module.layer_idx, []
        if self.rows:
            q, k, v = (t[0, :, :self.rows].transpose(0, 1).unsqueeze(2) for t in (query, key, value))
            keys, values = self.batch_cache.layers[layer].update(k, v)
            output, _ = sdpa_attention_forward(module, q, keys, values, self.batch_mask, scaling=scaling)
            parts.append(output.transpose(0, 1))  # [rows, 1, heads, dim] -> [1, rows, heads, dim]
        start = self.rows
        for segment in self.segments:
            end = start + segment.length
            keys, values = _append(segment.cache.layers[layer], key[:, :, start:end], value[:, :, start:end])
            mask = _causal_after(segment.done, segment.length, query.device) if segment.done else None
            output, _ = sdpa_attention_forward(module, query[:, :, start:end], keys, values, mask, scaling=scaling)
            parts.append(output)
            start = end
        return torch.cat(parts, dim=1), None


def _append(cache_layer, keys, values) -> tuple:
    """A prompt's cache layer after `keys`/`values` are appended: exactly sized tensors (no room to grow as the
    batch's have), since prompt caches are kept as they are by the prefix cache."""
    import torch

    if not cache_layer.is_initialized:
        cache_layer.lazy_initialization(keys, values)
        cache_layer.keys, cache_layer.values = keys.clone(), values.clone()
    else:
        cache_layer.keys = torch.cat([cache_layer.keys, keys], dim=-2)
        cache_layer.values = torch.cat([cache_layer.values, values], dim=-2)
    return cache_layer.keys, cache_layer.values


@contextmanager
def fused(step: FusedStep):
    """Attention of models running with `ATTENTION` serves `step` (in this thread) until the block ends."""
    token = _current_step.set(step)
    try:
        yield
    finally:
        _current_step.reset(token)


def fused_forward(model, step: FusedStep, input_ids, position_ids, logits_to_keep):
    """One pass over the step's tokens ([1, tokens]); logits only at `logits_to_keep` (a 1-D index tensor)."""
    with fused(step):
        return model(input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep, use_cache=False)


def enable_fused_steps(model, select_rows=None) -> bool:
    """Let `model` run fused steps when its attention is SDPA over full (not sliding) windows, its rotary embeddings
    do not rescale with length, and a calibration step matches separate passes; True when it does. `select_rows(adapters, along_tokens)` picks adapter rows first."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return False
    if not _positions_stay_per_token(config):
        return False
    _register()
    config._attn_implementation = ATTENTION
    try:
        if _matches_separate_passes(model, select_rows):
            return True
    except Exception:  # a model this does not fit: it keeps separate passes
        pass
    config._attn_implementation = "sdpa"
    return False


def disable_fused_steps(model) -> None:
    if getattr(model.config, "_attn_implementation", None) == ATTENTION:
        model.config._attn_implementation = "sdpa"


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    step = _current_step.get()
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return step.attend(module, query, key, value, scaling)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # outside fused steps its masks are SDPA's


def _positions_stay_per_token(config) -> bool:
    """Full attention (no sliding windows, which the fused attention does not apply) and rotary embeddings that do not
    rescale with the longest position in the pass ("dynamic", "longrope": a prompt's tokens would see another scale
    beside long rows than alone; short calibration prompts would not show it)."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    return not sliding and all(kind == "full_attention" for kind in layer_types) \
        and rope_type not in ("dynamic", "longrope")


def _causal_after(done: int, length: int, device):
    """[1, 1, length, done + length] booleans: query i sees the `done` held tokens and the new ones up to itself."""
    import torch

    keys = torch.arange(done + length, device=device)
    return (keys[None, :] <= done + torch.arange(length, device=device)[:, None])[None, None]


def _matches_separate_passes(model, select_rows) -> bool:
    """A fused step (one running row, one prompt after a held prefix) gives the logits of separate passes."""
    import torch

    from tunesmith.generation.padded_batch import PaddedBatch, new_cache

    device = next(model.parameters()).device
    first, second, held = [3, 5, 7, 9, 11, 13], [4, 6, 8, 10, 12], 2
    if select_rows is not None:
        select_rows([None], False)

    def prefill(ids: list[int], cache, start: int = 0):
        positions = torch.arange(start, start + len(ids), device=device)[None]
        return model(input_ids=torch.tensor([ids], device=device), position_ids=positions, past_key_values=cache,
                     use_cache=True).logits[0, -1].float()

    with torch.inference_mode():
        running, prompt = new_cache(model), new_cache(model)
        prefill(first, running)
        prefill(second[:held], prompt)
        alone = [prefill([1], running, len(first)), prefill(second[held:], prompt, held)]
        running, prompt = new_cache(model), new_cache(model)
        prefill(first, running)
        prefill(second[:held], prompt)
        batch = PaddedBatch.of_prefixes(model, [running], [len(first)])
        batch.step_inputs()
        step = FusedStep(1, batch.cache, None, [Segment(prompt, held, len(second) - held)])
        if select_rows is not None:
            select_rows([None] * (1 + len(second) - held), True)
        ids = torch.tensor([[1, *second[held:]]], device=device)
        positions = torch.tensor([[len(first), *range(held, len(second))]], device=device)
        logits = fused_forward(model, step, ids, positions, torch.tensor([0, len(second) - held], device=device))
        together = logits.logits[0].float()
    scale = max(float(part.abs().max()) for part in alone)
    return all(float((mine - theirs).abs().max()) <= 0.02 * scale + 1e-4 for mine, theirs in zip(together, alone))
