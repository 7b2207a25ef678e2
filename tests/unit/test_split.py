"""Content-hash split: deterministic, stable under appends, seed-dependent; dataset hash ignores row order."""

from __future__ import annotations

import random

from conftest import order_rows

from tunesmith.data.split import content_hash, dataset_hash, split_by_content_hash
from tunesmith.types import ChatExample


def examples(count: int) -> list[ChatExample]:
    return [ChatExample.model_validate(row) for row in order_rows(count)]


def keys(rows: list[ChatExample]) -> list[str]:
    return [content_hash(e) for e in rows]


def test_split_is_deterministic_and_partitions_the_input():
    rows = examples(200)
    train, validation = split_by_content_hash(rows, 0.2, seed=0)
    again = split_by_content_hash(examples(200), 0.2, seed=0)
    assert (keys(train), keys(validation)) == (keys(again[0]), keys(again[1]))
    assert sorted(keys(train) + keys(validation)) == sorted(keys(rows))
    assert train and validation


def test_split_is_roughly_the_requested_fraction():
    rows = examples(1000)
    for fraction in (0.1, 0.2, 0.5):
        _, validation = split_by_content_hash(rows, fraction, seed=0)
        assert abs(len(validation) / len(rows) - fraction) <= 0.05, fraction


def test_edge_fractions_put_everything_on_one_side():
    rows = examples(100)
    assert split_by_content_hash(rows, 0.0)[1] == []
    assert split_by_content_hash(rows, 1.0)[0] == []


def test_appending_rows_never_moves_an_old_row():
    old_rows, all_rows = examples(300), examples(600)
    old_train, old_val = split_by_content_hash(old_rows, 0.2, seed=3)
    new_train, new_val = split_by_content_hash(all_rows, 0.2, seed=3)
    assert set(keys(old_val)) <= set(keys(new_val))
    assert set(keys(old_train)) <= set(keys(new_train))


def test_split_does_not_depend_on_row_order():
    rows = examples(200)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert set(keys(split_by_content_hash(rows, 0.2)[1])) == set(keys(split_by_content_hash(shuffled, 0.2)[1]))


def test_a_different_seed_gives_a_different_split():
    rows = examples(200)
    held_out = [set(keys(split_by_content_hash(rows, 0.2, seed=seed)[1])) for seed in (0, 1)]
    assert held_out[0] != held_out[1]


def test_dataset_hash_ignores_row_order_but_not_content():
    rows = examples(50)
    reversed_rows = list(reversed(rows))
    assert dataset_hash(rows) == dataset_hash(reversed_rows)

    edited = [e.model_copy(deep=True) for e in rows]
    edited[10].messages[-1].content += " "
    assert dataset_hash(edited) != dataset_hash(rows)
    assert dataset_hash(rows[:-1]) != dataset_hash(rows)


def test_content_hash_ignores_source_line_but_not_messages():
    row = order_rows(1)[0]
    a = ChatExample.model_validate({**row, "source_line": 1})
    b = ChatExample.model_validate({**row, "source_line": 99})
    assert content_hash(a) == content_hash(b)

    other_role = ChatExample.model_validate(row)
    other_role.messages.insert(0, other_role.messages[0].model_copy(update={"role": "system"}))
    assert content_hash(other_role) != content_hash(a)
    assert content_hash(ChatExample.model_validate(order_rows(2)[1])) != content_hash(a)
