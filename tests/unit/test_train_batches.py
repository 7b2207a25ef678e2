"""Padding-free packing keeps examples apart; the step plan does not depend on the process count or on resuming."""

from __future__ import annotations

import torch

from tunesmith.data.template import IGNORE_INDEX, TokenizedExample
from tunesmith.models import load_model
from tunesmith.train.batches import StepPlan, micro_batches, padded_batch, padding_free_batch, trained_token_count
from tunesmith.train.loop import trained_token_loss_module


def _examples() -> list[TokenizedExample]:
    torch.manual_seed(1)
    examples = []
    for length in (9, 17, 5, 12):
        ids = torch.randint(3, 300, (length,)).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2:]))
    return examples


def test_padding_free_rows_give_each_example_exactly_its_own_loss(tiny_model_dir):
    model = load_model(tiny_model_dir)
    model.config.use_cache = False
    loss = trained_token_loss_module(model)
    examples = _examples()
    with torch.no_grad():
        alone = sum(loss(**padded_batch([e], pad_token_id=0)).item() for e in examples)
        padded = loss(**padded_batch(examples, pad_token_id=0)).item()
        packed_batch = padding_free_batch(examples)
        packed = loss(**packed_batch).item()
        # The same row without restarting positions lets examples see each other: the loss changes.
        leaky = loss(input_ids=packed_batch["input_ids"], labels=packed_batch["labels"]).item()
    assert packed_batch["input_ids"].shape[0] == 1
    assert abs(packed - alone) < 1e-4 * alone and abs(padded - alone) < 1e-4 * alone
    assert abs(leaky - alone) > 1e-3 * alone


def test_the_first_token_of_a_packed_example_is_not_trained_from_the_previous_example():
    examples = [TokenizedExample([5, 6, 7], [5, 6, 7]), TokenizedExample([8, 9], [8, 9])]
    batch = padding_free_batch(examples)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert sum(trained_token_count(e) for e in examples) == 3


def test_step_plan_is_fixed_by_seed_and_split_evenly_across_processes():
    plan = StepPlan(examples=10, global_batch=4, seed=3)
    assert plan.steps_per_epoch == 3 and plan.total_steps(epochs=2, max_steps=None) == 6
    first_epoch = [i for step in range(3) for i in plan.step_examples(step)]
    assert sorted(first_epoch) == list(range(10))
    assert plan.step_examples(3) != plan.step_examples(0) or plan.step_examples(4) != plan.step_examples(1)
    assert StepPlan(10, 4, 3).step_examples(5) == plan.step_examples(5)
    step = plan.step_examples(0)
    one = micro_batches(step, batch_size=2, rank=0, world_size=1)
    two = [micro_batches(step, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert one == [step[:2], step[2:4]]
    assert [sorted(a + b) for a, b in zip(*two)] == [sorted(m) for m in one]


def test_grouping_by_length_cuts_padding_and_still_sees_every_example_once_per_epoch():
    import random

    rng = random.Random(0)
    lengths = tuple(rng.randint(10, 300) for _ in range(1000))
    grouped, plain = StepPlan(1000, 8, 3, lengths), StepPlan(1000, 8, 3)

    def padding(plan, epoch):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        return sum(8 * max(lengths[i] for i in plan.step_examples(s)) - sum(lengths[i] for i in plan.step_examples(s))
                   for s in steps)

    for epoch in (0, 1):
        steps = range(epoch * grouped.steps_per_epoch, (epoch + 1) * grouped.steps_per_epoch)
        assert sorted(i for s in steps for i in grouped.step_examples(s)) == list(range(1000))
        assert padding(grouped, epoch) < padding(plain, epoch) / 10
    first_steps = [max(lengths[i] for i in grouped.step_examples(s)) for s in range(50)]
    assert first_steps != sorted(first_steps, reverse=True)  # long and short steps stay mixed in time
    assert StepPlan(1000, 8, 3, lengths).step_examples(130) == grouped.step_examples(130)  # a resumed run
