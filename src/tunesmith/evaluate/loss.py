"""Validation loss and perplexity on assistant tokens only, weighted by token count."""

from __future__ import annotations

import math

from tunesmith.data.batching import PaddingCollator
from tunesmith.data.template import TokenizedExample


def assistant_token_loss(model, examples: list[TokenizedExample], pad_token_id: int, batch_size: int) -> dict:
    """Mean cross-entropy over trained (assistant) tokens, and its perplexity."""
    import torch

    collate = PaddingCollator(pad_token_id)
    total_loss, total_tokens = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for start in range(0, len(ordered), batch_size):
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in ordered[start:start + batch_size]])
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
        total_loss += losses.item()
        total_tokens += int((targets != -100).sum())
    mean = total_loss / max(total_tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": total_tokens}
