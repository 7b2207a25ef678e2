"""OpenAI-compatible fine-tuning jobs: files, a persistent queue, a supervisor and the runner process of one job."""
