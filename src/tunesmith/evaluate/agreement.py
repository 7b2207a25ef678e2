"""Do two models answer alike? Greedy answers, logits and answer perplexity of a reference and a candidate
(an export checked against what it was made from), on the same held-out prompts."""

from __future__ import annotations

import math

from tunesmith.data.template import tokenize_example
from tunesmith.evaluate.generate import generate_batched
from tunesmith.evaluate.loss import assistant_token_loss


def compare_answers(reference, candidate, tokenizer, examples, stop_ids: list[int], max_new_tokens: int,
                    batch_size: int = 8, max_length: int = 1024) -> dict:
    """Share of identical greedy answers, the largest logit difference over the reference answers' tokens,
    and each model's perplexity on those answers."""
    conversations = [e.prompt_messages() for e in examples]
    tools = [e.tools for e in examples]
    answers = [generate_batched(model, tokenizer, conversations, stop_ids, max_new_tokens, batch_size, tools=tools)
               for model in (reference, candidate)]
    same = [a.text == b.text for a, b in zip(*answers)]
    tokenized = [tokenize_example(tokenizer, e.message_dicts(), max_length, e.tools) for e in examples]
    losses = [assistant_token_loss(model, tokenized, tokenizer.pad_token_id, batch_size)["loss"]
              for model in (reference, candidate)]
    return {
        "prompts": len(examples),
        "identical_answers": sum(same),
        "agreement": round(sum(same) / max(len(same), 1), 4),
        "max_logit_difference": round(max_logit_difference(reference, candidate, tokenized), 5),
        "reference_perplexity": round(math.exp(min(losses[0], 50)), 4),
        "perplexity": round(math.exp(min(losses[1], 50)), 4),
        "perplexity_change": round(math.exp(min(losses[1], 50)) / math.exp(min(losses[0], 50)) - 1, 5),
        "differing_examples": [{"line": e.source_line, "reference": a.text, "candidate": b.text}
                               for e, a, b, s in zip(examples, *answers, same) if not s][:5],
    }


def max_logit_difference(reference, candidate, tokenized) -> float:
    """Largest |logit difference| over every position of the examples, prompt and answer."""
    import torch

    largest = 0.0
    for example in tokenized:
        ids = torch.tensor([example.input_ids])
        with torch.inference_mode():
            difference = reference(input_ids=ids).logits.float() - candidate(input_ids=ids).logits.float()
        largest = max(largest, float(difference.abs().max()))
    return largest
