"""Turning tokenized examples into padded training batches."""

from __future__ import annotations

from tunesmith.data.template import IGNORE_INDEX, TokenizedExample


class TokenizedDataset:
    """A list of tokenized examples in the shape transformers' Trainer reads."""

    def __init__(self, examples: list[TokenizedExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


class PaddingCollator:
    """Right-pads a batch to its longest example; padding is never attended to nor trained on.

    Padding is marked by position, not by token id, because many models pad with their EOS token,
    and masking by id would silently stop the model from learning to end its answer.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, labels, attention = [], [], []
        for feature in features:
            pad = width - len(feature["input_ids"])
            ids.append(list(feature["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(feature["labels"]) + [IGNORE_INDEX] * pad)
            attention.append([1] * len(feature["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(attention)}
