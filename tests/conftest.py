"""Shared fixtures: an isolated tunesmith home and a tiny chat model built from scratch (no downloads)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Extract the order as JSON with keys item, quantity, color, city.",
    '{"item": "mug", "quantity": 3, "color": "blue", "city": "Denver"}',
    "Please send three red lamps to Lisbon. Hello world, how are you today?",
    "system user assistant You are a helpful assistant.",
]


def build_tiny_model(target: Path) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer and a ChatML template, saved as a HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=0.3)  # large enough that logits can move far from uniform
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Each test gets its own TUNESMITH_HOME, except that the converted default model is shared."""
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def order_rows(count: int) -> list[dict]:
    colors, cities, items = ["red", "blue", "green"], ["Denver", "Lisbon", "Osaka", "Oslo"], ["mug", "lamp", "hat"]
    rows = []
    for n in range(count):
        item, color, city = items[n % 3], colors[(n // 3) % 3], cities[(n // 9) % 4]
        rows.append({"messages": [
            {"role": "user", "content": f"Send {n % 7 + 1} {color} {item} to {city} (ref {n})"},
            {"role": "assistant", "content": json.dumps({"item": item, "quantity": n % 7 + 1, "color": color,
                                                         "city": city})},
        ]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir) -> Path:
    """A YAML config that trains the tiny model for a few steps on 40 order rows."""
    data = write_jsonl(tmp_path / "orders.jsonl", order_rows(40))
    config = {
        "name": "tiny", "base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "runs"),
        "data": {"train": str(data), "validation_fraction": 0.2, "max_length": 128},
        "train": {"max_steps": 4, "batch_size": 4, "logging_steps": 1, "precision": "fp32", "threads": 1,
                  "lora": {"r": 4, "alpha": 8}},
        "evaluate": {"max_new_tokens": 8, "batch_size": 4, "json_output": True, "general_questions": 40},
    }
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def make_trained_run(folder: Path, model_dir: Path, name: str, seed: int, steps: int) -> Path:
    """Prepare, train and evaluate a tiny run (a few seconds)."""
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.evaluate.run import evaluate_run
    from tunesmith.train.sft import train_sft

    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "orders.jsonl", order_rows(40))
    config_path = folder / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump({
        "name": name, "base_model": str(model_dir), "output_dir": str(folder / "runs"), "seed": seed,
        "data": {"train": str(data), "validation_fraction": 0.2, "max_length": 128},
        "train": {"max_steps": steps, "batch_size": 4, "precision": "fp32", "threads": 1, "learning_rate": 0.01,
                  "lora": {"r": 4, "alpha": 8}},
        "evaluate": {"max_new_tokens": 8, "batch_size": 8, "json_output": True, "general_check": False,
                     "bootstrap_samples": 50},
    }), encoding="utf-8")
    config = load_config(config_path)
    run_dir = prepare(config)
    train_sft(run_dir, config)
    evaluate_run(run_dir, config)
    return run_dir


@pytest.fixture(scope="session")
def two_versions(tmp_path_factory, tiny_model_dir) -> list[Path]:
    """Two tiny fine-tuned versions of one base, `alpha` and `beta`, trained once for every module serving them."""
    root = tmp_path_factory.mktemp("two-versions")
    return [make_trained_run(root / name, tiny_model_dir, name, seed, steps=6)
            for name, seed in (("alpha", 1), ("beta", 2))]


@pytest.fixture(scope="module")
def server_url(engine):
    """The test module's `engine` fixture behind the OpenAI-compatible app on a loopback port."""
    from tunesmith.serve.app import build_app

    with serving_on_loopback(build_app(engine)) as url:
        yield url


@pytest.fixture
def client(server_url):
    """The official `openai` client pointed at `server_url`."""
    import openai

    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0)


@contextmanager
def serving_on_loopback(app):
    """Run an ASGI app under uvicorn in a background thread on a free 127.0.0.1 port; yields its base URL."""
    import threading
    import time

    import uvicorn

    from tunesmith.serve.http_protocol import OpenAIErrorH11Protocol

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           http=OpenAIErrorH11Protocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
