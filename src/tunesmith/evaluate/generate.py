"""Batched greedy generation with a KV cache, recording whether each answer ended on its own."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.template import generation_prompt_ids


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool
    """True when the model emitted an end-of-turn token; False when it ran into the token limit."""


def generate_batched(model, tokenizer, conversations: list[list[dict]], stop_ids: list[int],
                     max_new_tokens: int, batch_size: int, on_batch=None,
                     tools: list[list[dict] | None] | None = None) -> list[Generation]:
    """Greedy answers for each conversation (offered its `tools`, if any), batched by prompt length, in input order."""
    import torch

    tools = tools or [None] * len(conversations)
    prompts = [generation_prompt_ids(tokenizer, messages, offered) for messages, offered in zip(conversations, tools)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        # Left padding keeps every prompt's last token at the same position, where generation starts.
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in batch])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
        for row, index in enumerate(batch):
            results[index] = _decode(tokenizer, output[row, width:].tolist(), stop_ids)
        if on_batch:
            on_batch(len(batch))
    return results


def _decode(tokenizer, new_ids: list[int], stop_ids: list[int]) -> Generation:
    stop_at = next((k for k, token in enumerate(new_ids) if token in stop_ids), None)
    answer = new_ids if stop_at is None else new_ids[:stop_at]
    text = tokenizer.decode(answer, skip_special_tokens=True).strip()
    return Generation(text=text, new_tokens=len(answer) + (stop_at is not None), stopped=stop_at is not None)
