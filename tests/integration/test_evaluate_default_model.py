"""The shipped forgetting-check sets on the real default model: answerable, not saturated, sane perplexity."""

from __future__ import annotations

import pytest

from tunesmith import models
from tunesmith.data.template import end_of_turn_token_ids
from tunesmith.evaluate.general import general_check


@pytest.fixture
def shared_home(monkeypatch):
    """The user's tunesmith home, so the default model is converted once per machine, not once per test."""
    monkeypatch.delenv("TUNESMITH_HOME")
    return models.tunesmith_home()


def test_general_sets_measure_the_default_model_meaningfully(shared_home):
    source = models.resolve_base_model("default")
    tokenizer, model = models.load_tokenizer(source), models.load_model(source)
    result = general_check(model, tokenizer, end_of_turn_token_ids(tokenizer), batch_size=16)
    # SmolLM2-135M-Instruct knows about half of these (0.526 of 466 when written; 0.775 of the first 40): room to
    # detect forgetting either way.
    assert 0.4 <= result["general_qa"] < 0.8
    assert 5 < result["general_ppl"] < 40  # 28.1 when written; a broken tokenizer or model lands far outside
    assert any("Paris" in answer for answer in result["answers"])
