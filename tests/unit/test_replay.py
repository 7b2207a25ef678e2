"""Replay of general rows (data.replay): self-distilled from the base model once and cached, or read from a file;
trained on beside the task's rows, never held out, hash-checked."""

import json

import pytest

from tunesmith.config import load_config
from tunesmith.data.prepare import prepare
from tunesmith.data.replay import read_replay, shipped_replay_prompts, write_replay
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer
from tunesmith.registry.run import Run

from tests.conftest import write_jsonl

PROMPTS = [f"Say something about the number {n}." for n in range(30)]


def _config(tiny_config, *overrides):
    return load_config(tiny_config, ["train.max_steps=2", *overrides])


def test_self_distilled_rows_are_the_base_models_answers_generated_once(tiny_config, tiny_model_dir, tmp_path, monkeypatch):
    config = _config(tiny_config, "data.replay.share=0.25", "data.replay.max_new_tokens=6")
    tokenizer = load_tokenizer(tiny_model_dir)
    generated = []
    import tunesmith.data.replay as replay

    real_generate = replay._generate

    def generate(*args):  # the tiny model rarely stops within 6 tokens: keep its answers as a real model's would be
        generated.append(args[2])
        return {p: {**a, "stopped": True} for p, a in real_generate(*args).items()}

    monkeypatch.setattr(replay, "_generate", generate)
    first = write_replay(config, tiny_model_dir, tokenizer, 40, tmp_path, PROMPTS)
    rows = [json.loads(line)["messages"] for line in (tmp_path / "replay.jsonl").read_text().splitlines()]
    assert first["rows"] == len(rows) and first["rows"] + first["cut_answers_left_out"] == 10
    assert first["generated_now"] == 10 and len(rows) >= 8
    assert all(row[0]["content"] in PROMPTS and row[1]["role"] == "assistant" for row in rows)
    # The answers are the base model's greedy answers to exactly those prompts.
    from tunesmith.data.template import end_of_turn_token_ids
    from tunesmith.generation.batch_generate import generate_batched
    from tunesmith.models import load_model

    direct = generate_batched(load_model(tiny_model_dir), tokenizer, [[row[0]] for row in rows],
                              end_of_turn_token_ids(tokenizer), 6, 4)
    assert [row[1]["content"] for row in rows] == [d.text for d in direct]

    again = write_replay(config, tiny_model_dir, tokenizer, 40, tmp_path, PROMPTS)
    assert again["generated_now"] == 0 and again["sha256"] == first["sha256"] and len(generated) == 1
    more = write_replay(_config(tiny_config, "data.replay.share=0.5", "data.replay.max_new_tokens=6"), tiny_model_dir,
                        tokenizer, 40, tmp_path, PROMPTS)
    assert more["generated_now"] == 10 and len(generated) == 2  # the first ten were cached


def test_prepared_replay_is_trained_beside_the_task_rows_and_checked(tiny_config, tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"messages": [{"role": "user", "content": f"Name a colour, {n}."},
                      {"role": "assistant", "content": "Blue."}]} for n in range(20)])
    config = _config(tiny_config, "data.replay.share=0.25", f"data.replay.source={general}")
    run_dir = prepare(config)
    run = Run.open(run_dir)
    section = run.manifest.data.replay
    assert section.rows == round(0.25 * run.manifest.data.rows["train"]) and section.source == str(general)
    replayed = read_replay(run)
    assert len(replayed) == section.rows and all(r.messages[-1].content == "Blue." for r in replayed)
    validation = (run_dir / "data" / "validation.jsonl").read_text()
    assert "Name a colour" not in validation and "Name a colour" not in (run_dir / "data" / "train.jsonl").read_text()

    from tunesmith.train.sft import train_sft

    section = train_sft(run_dir, config)
    assert section["metrics"]["steps"] == 2

    (run_dir / "data" / "replay.jsonl").write_text("{}\n")
    with pytest.raises(TunesmithError, match="differs from what prepare wrote"):
        read_replay(Run.open(run_dir))


def test_a_missing_replay_file_is_refused(tiny_config, tmp_path):
    with pytest.raises(TunesmithError, match="no such file"):
        prepare(_config(tiny_config, "data.replay.share=0.2", f"data.replay.source={tmp_path / 'none.jsonl'}"))


def test_self_distilled_replay_is_on_by_default_and_off_at_zero(tiny_config):
    run = Run.open(prepare(_config(tiny_config)))
    section = run.manifest.data.replay
    assert section.source == "self_distill" and section.share == 0.25
    assert section.rows + section.cut_answers_left_out == round(0.25 * run.manifest.data.rows["train"])
    assert Run.open(prepare(_config(tiny_config, "data.replay.share=0"), overwrite=True)).manifest.data.replay is None


def test_shipped_prompts_are_packaged():
    prompts = shipped_replay_prompts()
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
