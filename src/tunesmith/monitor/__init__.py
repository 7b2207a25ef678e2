"""The monitor stage: production traffic (the request log and feedback files) against the training data.

`run.monitor` is the entry point; `drift` compares prompts, `quality` measures answers and feedback, `report`
prints and writes the result.
"""
