"""The one generation engine behind serving and evaluation: continuous batching over a shared base model."""
