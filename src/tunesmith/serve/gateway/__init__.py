"""What stands in front of the engine: API keys and usage, rate limits, metrics, the request log, traffic routing."""
