"""The prompting baseline: the base model shown k training examples as few-shot turns before each request, and what
those extra prompt tokens cost.

`tunesmith evaluate` scores it as the `prompt-baseline` contender; `tunesmith advise` uses the same functions to weigh
fine-tuning against prompting.
"""

from __future__ import annotations

import random

from tunesmith.data.template import IGNORE_INDEX, TokenizedExample, generation_prompt_ids, tokenize_example
from tunesmith.errors import TunesmithError
from tunesmith.types import ChatExample, ChatMessage, PreferenceExample

SELECTIONS = ("similar", "random")


def few_shot_conversations(train_examples: list[ChatExample | dict], eval_examples: list[ChatExample | dict], k: int,
                           selection: str, seed: int) -> list[list[dict]]:
    """Each held-out example's prompt turns with k training examples inserted as user/assistant turns after the
    system prompt (if any); the most similar example sits closest to the request."""
    if k < 0:
        raise TunesmithError(f"prompt baseline: {k} examples per prompt; give 0 or more")
    if selection not in SELECTIONS:
        raise TunesmithError(f"prompt baseline selection {selection!r} is not one of {', '.join(SELECTIONS)}")
    train = [_messages(example) for example in train_examples]
    prompts = [_messages(example)[:-1] for example in eval_examples]
    if k == 0 or not train:
        return prompts
    if selection == "random":
        chosen = random.Random(seed).sample(range(len(train)), min(k, len(train)))
        picks = [chosen] * len(prompts)
    else:
        picks = most_similar([_request_text(m[:-1]) for m in train], [_request_text(p) for p in prompts], k)
    return [_with_shots(prompt, [train[i] for i in picked]) for prompt, picked in zip(prompts, picks)]


def training_examples(run) -> list[ChatExample]:
    """The run's training split as chat examples; a preference record shows its preferred (or desirable) reply."""
    from tunesmith.data.prepare import read_preference_split, read_split

    if run.data_kind == "sft":
        return read_split(run.directory, "train")
    shots = []
    for record in read_preference_split(run.directory, "train"):
        good = record.chosen if isinstance(record, PreferenceExample) else record.completion if record.label else None
        if good is not None:
            shots.append(ChatExample(messages=[*record.messages, ChatMessage(role="assistant", content=good)]))
    return shots


def most_similar(train_texts: list[str], requests: list[str], k: int) -> list[list[int]]:
    """For each request, the indices of the k most similar training texts (TF-IDF cosine), least similar first."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    # Single characters count: in short task prompts a digit or a size letter is often what tells examples apart.
    vectorizer = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", sublinear_tf=True)
    try:
        train_matrix = vectorizer.fit_transform(train_texts)
    except ValueError:  # no word in any training prompt: nothing to rank by, so keep the file order
        return [list(range(min(k, len(train_texts))))[::-1] for _ in requests]
    similarity = (vectorizer.transform(requests) @ train_matrix.T).toarray()
    ranked = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return [row[::-1].tolist() for row in ranked]


def extra_prompt_tokens(tokenizer, plain: list[list[dict]], few_shot: list[list[dict]]) -> float:
    """Mean prompt tokens the few-shot conversations add per request over the plain ones."""
    if not plain:
        return 0.0
    extra = [len(generation_prompt_ids(tokenizer, long)) - len(generation_prompt_ids(tokenizer, short))
             for short, long in zip(plain, few_shot)]
    return sum(extra) / len(extra)


def cost_per_million_requests(tokens: float, price: float) -> float:
    """What `tokens` extra prompt tokens per request cost over 1M requests at `price` per 1M prompt tokens."""
    return tokens * price


def check_fits_context(tokenizer, conversations: list[list[dict]], max_new_tokens: int, context_length: int | None,
                       k: int) -> None:
    """Refuse few-shot prompts that, with the answer budget, do not fit the model's context (never cut them)."""
    if not context_length:
        return
    for index, messages in enumerate(conversations):
        length = len(generation_prompt_ids(tokenizer, messages))
        if length + max_new_tokens > context_length:
            raise TunesmithError(
                f"evaluate.prompt_baseline={k}: held-out example {index + 1}'s few-shot prompt is {length} tokens, and "
                f"with evaluate.max_new_tokens={max_new_tokens} it exceeds the model's context of {context_length}; "
                "lower evaluate.prompt_baseline or evaluate.max_new_tokens")


def few_shot_tokenized(tokenizer, conversations: list[list[dict]], references: list[str],
                       tools: list[list[dict] | None]) -> list[TokenizedExample]:
    """Each few-shot prompt followed by its reference answer, with only that answer trained (for the loss), uncut."""
    tokenized = []
    for messages, reference, offered in zip(conversations, references, tools):
        full = tokenize_example(tokenizer, [*messages, {"role": "assistant", "content": reference}], 10**9, offered)
        prompt_length = len(generation_prompt_ids(tokenizer, messages, offered))
        labels = [IGNORE_INDEX] * prompt_length + full.labels[prompt_length:]
        tokenized.append(TokenizedExample(input_ids=full.input_ids, labels=labels))
    return tokenized


def _messages(example: ChatExample | dict) -> list[dict]:
    if isinstance(example, ChatExample):
        return example.message_dicts()
    return [dict(message) for message in example["messages"]]


def _request_text(prompt: list[dict]) -> str:
    return "\n".join(m.get("content") or "" for m in prompt if m.get("role") != "system")


def _with_shots(prompt: list[dict], shots: list[list[dict]]) -> list[dict]:
    head = prompt[:1] if prompt and prompt[0].get("role") == "system" else []
    turns = [m for shot in shots for m in shot if m.get("role") != "system"]
    return [*head, *turns, *prompt[len(head):]]
