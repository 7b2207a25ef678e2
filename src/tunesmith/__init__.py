"""tunesmith: labeled data -> fine-tuned open-weights LLM that beats its base, served and measured."""

__version__ = "0.1.0"
