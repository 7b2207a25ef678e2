"""One model in memory as the engine holds it: its weights packed for decoding, adapters stacked so rows of
different versions share a pass, and the rows it is decoding with their padded batch."""

from __future__ import annotations

import itertools

from tunesmith.generation.fused_step import FusedStep, disable_fused_steps, enable_fused_steps, fused_forward
from tunesmith.generation.multi_lora import AdapterRows, add_stacked_adapter, remove_stacked_adapter
from tunesmith.generation.packed_linear import pack, unpack
from tunesmith.generation.padded_batch import PaddedBatch, new_cache
from tunesmith.generation.sibling_lora import group_siblings, ungroup_siblings

_group_keys = itertools.count()


class ModelGroup:
    """One model in memory and the rows it is decoding. With `adapter_rows` (a model whose adapters were stacked
    by `multi_lora.stack_adapters`) each row may use a different adapter, or none."""

    def __init__(self, model, adapter_rows=None):
        self.model, self.adapter_rows = model, adapter_rows
        self.key = next(_group_keys)  # names its prefix-cache entries; an id() could come back for a later group
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        new_cache(model)  # refuses cache layouts the padded batch cannot handle, at load time
        if adapter_rows is not None:  # before `pack`: the groups take the adapted layers' base weights
            group_siblings(model, adapter_rows)
        pack(model)  # until `unpack`: the model decodes faster but cannot train (see packed_linear)
        self.fuses = enable_fused_steps(model, self._select)
        """Whether new prompts are prefilled in the running rows' decode pass (see fused_step)."""
        self.batch = PaddedBatch()
        self.rows: list = []
        """The engine's rows being decoded, in the order of the batch's rows."""

    def unpack(self) -> None:
        """Give the model back as it was loaded (dense weights), for a caller that goes on using it."""
        disable_fused_steps(self.model)
        ungroup_siblings(self.model)
        unpack(self.model)

    def add_adapter(self, name: str, updates: dict) -> None:
        """Stack one more adapter (its `multi_lora.low_rank_updates`) on this group's model; between steps only."""
        if self.adapter_rows is None:  # a base served alone so far: its layers become stackable ones as adapters come
            self.adapter_rows = AdapterRows({})
        ungroup_siblings(self.model)
        try:
            add_stacked_adapter(self.model, self.adapter_rows, name, updates)
        finally:  # the layers' A and B changed: sibling layers compute their updates together again
            group_siblings(self.model, self.adapter_rows)

    def remove_adapter(self, name: str) -> None:
        """Free a stacked adapter's slot; between steps, once no row uses it."""
        ungroup_siblings(self.model)
        try:
            remove_stacked_adapter(self.model, self.adapter_rows, name)
        finally:
            group_siblings(self.model, self.adapter_rows)

    def forward(self, input_ids, adapters: list[str | None], **kwargs):
        self._select(adapters)
        return self.model(input_ids=input_ids, use_cache=True, **kwargs)

    def forward_fused(self, step: FusedStep, input_ids, adapters: list[str | None], position_ids, logits_to_keep):
        """One pass over a fused step's tokens ([1, tokens], `adapters` one per token)."""
        self._select(adapters, along_tokens=True)
        return fused_forward(self.model, step, input_ids, position_ids, logits_to_keep)

    def _select(self, adapters: list[str | None], along_tokens: bool = False) -> None:
        if self.adapter_rows is not None:
            self.adapter_rows.select(adapters, self.device, along_tokens)
