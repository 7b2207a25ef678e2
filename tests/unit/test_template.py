"""The loss mask: assistant answers and their end-of-turn token are trained, nothing else."""

from __future__ import annotations

from tunesmith.data.batching import PaddingCollator
from tunesmith.data.template import IGNORE_INDEX, end_of_turn_token_ids, tokenize_example
from tunesmith.models import load_tokenizer

MULTI_TURN = [
    {"role": "system", "content": "Reply in JSON."},
    {"role": "user", "content": "Send 3 red mugs to Denver"},
    {"role": "assistant", "content": '{"item": "mug", "quantity": 3}'},
    {"role": "user", "content": "And 2 lamps to Oslo"},
    {"role": "assistant", "content": '{"item": "lamp", "quantity": 2}'},
]


def trained_segments(tokenizer, example) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    segments, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return segments


def test_only_assistant_answers_and_their_end_of_turn_are_trained(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    example = tokenize_example(tokenizer, MULTI_TURN, max_length=1000)
    assert trained_segments(tokenizer, example) == [
        '{"item": "mug", "quantity": 3}<|im_end|>',
        '{"item": "lamp", "quantity": 2}<|im_end|>',
    ]


def test_labels_equal_input_ids_where_trained(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    example = tokenize_example(tokenizer, MULTI_TURN, max_length=1000)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels))
    assert example.trained_tokens > 0


def test_the_last_trained_token_is_the_end_of_turn_token(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    example = tokenize_example(tokenizer, MULTI_TURN, max_length=1000)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trained[-1] == eot
    assert end_of_turn_token_ids(tokenizer) == [eot]


def test_truncation_keeps_ids_and_labels_aligned(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    example = tokenize_example(tokenizer, MULTI_TURN, max_length=20)
    assert len(example.input_ids) == len(example.labels) == 20


def test_padding_is_masked_by_position_so_eos_stays_trained(tiny_model_dir):
    """The tiny model pads with its EOS token: the EOS at the end of each answer must survive padding."""
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = tokenize_example(tokenizer, MULTI_TURN[:3], max_length=1000)
    long = tokenize_example(tokenizer, MULTI_TURN, max_length=1000)
    batch = PaddingCollator(tokenizer.pad_token_id)([
        {"input_ids": short.input_ids, "labels": short.labels},
        {"input_ids": long.input_ids, "labels": long.labels},
    ])
    row = batch["labels"][0].tolist()
    pad = len(long.input_ids) - len(short.input_ids)
    assert row[: len(short.labels)] == short.labels  # the trained EOS is still there
    assert row[len(short.labels):] == [IGNORE_INDEX] * pad
    assert batch["attention_mask"][0].tolist() == [1] * len(short.input_ids) + [0] * pad
    assert short.labels[-2] == tokenizer.eos_token_id  # ... followed only by the template's newline
