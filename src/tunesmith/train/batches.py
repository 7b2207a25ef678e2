"""Which examples each optimizer step sees, and how a micro-batch becomes tensors (padding-free or padded).

The plan is a pure function of the seed, the data size and the global batch, never of the process count
or of where a run was interrupted: resuming, or splitting a step over N processes, sees the same examples.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from tunesmith.data.template import IGNORE_INDEX, TokenizedExample


# Examples whose lengths are grouped together: 50 global batches, as transformers' LengthGroupedSampler does.
GROUP_STEPS = 50


@dataclass(frozen=True)
class StepPlan:
    """Shuffled example order per epoch, cut into global batches of `global_batch` examples.

    With `lengths`, examples of similar length share a step so padded micro-batches waste little: each epoch's
    shuffled order is cut into groups of GROUP_STEPS global batches, a group is sorted by length and cut into
    batches, and the batches of a group are shuffled so long and short steps stay mixed in time.
    """

    examples: int
    global_batch: int
    seed: int
    lengths: tuple[int, ...] | None = None
    _orders: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.examples / self.global_batch))

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps else max(1, math.ceil(epochs * self.steps_per_epoch))

    def step_examples(self, step: int) -> list[int]:
        """Indices of the examples optimizer step `step` (0-based) trains on."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self._epoch_batches(epoch)[within]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._orders:
            self._orders.clear()  # one epoch at a time: the plan is consulted in step order
            self._orders[epoch] = self._batches(epoch)
        return self._orders[epoch]

    def _batches(self, epoch: int) -> list[list[int]]:
        order = list(range(self.examples))
        rng = random.Random(self.seed * 1_000_003 + epoch)
        rng.shuffle(order)
        size = self.global_batch
        if self.lengths is None:
            return [order[start:start + size] for start in range(0, self.examples, size)]
        batches = []
        for start in range(0, self.examples, size * GROUP_STEPS):
            group = sorted(order[start:start + size * GROUP_STEPS], key=lambda i: self.lengths[i], reverse=True)
            group_batches = [group[at:at + size] for at in range(0, len(group), size)]
            rng.shuffle(group_batches)
            batches += group_batches
        return batches


def micro_batches(indices: list[int], batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This process's share of each micro-batch of a step: every `world_size`-th example, starting at `rank`."""
    return [indices[start:start + batch_size][rank::world_size] for start in range(0, len(indices), batch_size)]


def trained_token_count(example: TokenizedExample) -> int:
    """Tokens whose loss is counted: labelled positions after the first (the first has no previous token)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def padding_free_batch(examples: list[TokenizedExample]) -> dict:
    """All examples in one row, no padding; position ids restart at 0 per example so attention stays inside each."""
    import torch

    ids, labels, positions = [], [], []
    for example in examples:
        ids += example.input_ids
        # The first token of an example must not be predicted from the previous example's last token.
        labels += [IGNORE_INDEX] + list(example.labels[1:])
        positions += range(len(example.input_ids))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


def padded_batch(examples: list[TokenizedExample], pad_token_id: int) -> dict:
    """Right-padded rows with an attention mask; padding is masked by position, never by token id."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids, labels, attention = [], [], []
    for example in examples:
        pad = width - len(example.input_ids)
        ids.append(list(example.input_ids) + [pad_token_id] * pad)
        labels.append(list(example.labels) + [IGNORE_INDEX] * pad)
        attention.append([1] * len(example.input_ids) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(attention)}


def make_batch(examples: list[TokenizedExample], packing: bool, pad_token_id: int) -> dict:
    """Tensors for one micro-batch of examples."""
    return padding_free_batch(examples) if packing else padded_batch(examples, pad_token_id)
