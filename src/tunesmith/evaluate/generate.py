"""Greedy answers for evaluation: the generation layer's batch generation, named where evaluation code looks for it."""

from tunesmith.generation.batch_generate import Generation, generate_batched

__all__ = ["Generation", "generate_batched"]
