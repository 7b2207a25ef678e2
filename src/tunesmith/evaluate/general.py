"""Forgetting check: perplexity on shipped general text and accuracy on shipped general questions.

Both sets live beside this file (`general/`, CC0, see its README) and are run on the base model and on
every candidate, so a fine-tune that breaks everyday language shows up as a worse `general_ppl` / `general_qa`.
"""

from __future__ import annotations

import json
import re
from importlib import resources

from tunesmith.data.template import TokenizedExample
from tunesmith.evaluate.generate import generate_batched
from tunesmith.evaluate.loss import assistant_token_loss

QUESTION_SUFFIX = " Answer in a few words."
QUESTION_MAX_NEW_TOKENS = 24


def _read_jsonl(name: str) -> list[dict]:
    text = resources.files("tunesmith.evaluate").joinpath("general", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def general_texts() -> list[str]:
    return [row["text"] for row in _read_jsonl("text.jsonl")]


def general_questions(limit: int | None = None) -> list[dict]:
    """The shipped general questions, or the first `limit` of them."""
    return _read_jsonl("questions.jsonl")[:limit]


def mentions_answer(prediction: str, answers: list[str]) -> bool:
    """True when an accepted answer appears in the prediction as whole words (case ignored); a number must be whole
    too, so "2" is not found in "2.5" or "1.2"."""
    return any(re.search(rf"(?<!\w)(?<!\d\.){re.escape(answer.lower())}(?!\w)(?!\.\d)", prediction.lower())
               for answer in answers)


def text_perplexity(model, tokenizer, batch_size: int) -> float:
    """Perplexity over every token of the shipped general text."""
    examples = []
    for text in general_texts():
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        examples.append(TokenizedExample(input_ids=ids, labels=list(ids)))
    return assistant_token_loss(model, examples, tokenizer.pad_token_id, batch_size)["perplexity"]


def question_scores(model, tokenizer, stop_ids: list[int], batch_size: int, on_batch=None,
                    limit: int | None = None) -> tuple[list[float], list[str]]:
    """Per-question correctness (1/0) on the shipped general questions (the first `limit`), and the answers given."""
    questions = general_questions(limit)
    conversations = [[{"role": "user", "content": q["question"] + QUESTION_SUFFIX}] for q in questions]
    outputs = generate_batched(model, tokenizer, conversations, stop_ids, QUESTION_MAX_NEW_TOKENS, batch_size,
                               on_batch=on_batch)
    return ([float(mentions_answer(o.text, q["answers"])) for o, q in zip(outputs, questions)],
            [o.text for o in outputs])


def general_check(model, tokenizer, stop_ids: list[int], batch_size: int, on_batch=None, limit: int | None = None) -> dict:
    """`general_ppl` (lower is better), `general_qa` (share right) and the per-question scores behind it."""
    per_question, answers = question_scores(model, tokenizer, stop_ids, batch_size, on_batch, limit)
    return {"general_ppl": text_perplexity(model, tokenizer, batch_size),
            "general_qa": sum(per_question) / len(per_question), "per_question": per_question, "answers": answers}
