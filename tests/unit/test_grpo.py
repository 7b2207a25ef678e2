"""GRPO with verifiable rewards: each shipped reward on hand-made answers, a user's reward file, a tiny run end to end."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tunesmith.config import GrpoConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.registry.run_dir import MANIFEST, read_json
from tunesmith.train.grpo import train_grpo
from tunesmith.train.loop import TrainingStopped
from tunesmith.train.rewards import SHIPPED, load_rewards

ORDER = '{"item": "mug", "quantity": 3, "color": "blue", "city": "Denver"}'


def scores(settings: GrpoConfig, completion: str, reference: str = ORDER) -> dict[str, float]:
    return {r.name: r.score(completion, reference) for r in load_rewards(settings)}


def test_json_rewards_score_validity_exact_match_and_shared_fields(tmp_path):
    settings = GrpoConfig(rewards=["json_valid", "exact_match", "field_match"])
    reordered = '{"city": "Denver", "color": "blue", "quantity": 3, "item": "mug"}'
    assert scores(settings, f" {reordered}\n") == {"json_valid": 1.0, "exact_match": 1.0, "field_match": 1.0}
    half_right = '{"item": "mug", "quantity": 3, "color": "red", "city": "Oslo"}'
    assert scores(settings, half_right) == {"json_valid": 1.0, "exact_match": 0.0, "field_match": 0.5}
    assert scores(settings, '{"item": "mug", "quantity": 3') == {"json_valid": 0.0, "exact_match": 0.0,
                                                                 "field_match": 0.0}
    assert scores(settings, "[1, 2]")["json_valid"] == 0.0  # one JSON object, as evaluation's json_valid
    # A text reference: exact match compares normalized text, field_match falls back to it.
    assert scores(settings, "Hello  World", "hello world") == {"json_valid": 0.0, "exact_match": 1.0,
                                                               "field_match": 1.0}


def test_schema_regex_and_length_rewards_follow_their_settings(tmp_path):
    schema = tmp_path / "order.schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["item", "quantity"],
                                  "properties": {"quantity": {"type": "integer", "minimum": 1}}}))
    settings = GrpoConfig(rewards=["json_schema", "regex", "length"], json_schema=schema,
                          regex=r"\{.*\}", target_length=10)
    assert scores(settings, ORDER) == {"json_schema": 1.0, "regex": 1.0, "length": 0.0}  # 66 chars: >= twice 10
    assert scores(settings, '{"item": 1}') == {"json_schema": 0.0, "regex": 1.0, "length": 0.9}
    assert scores(settings, "not json!!") == {"json_schema": 0.0, "regex": 0.0, "length": 1.0}
    # Unset target: the reference's length; half of it scores 0.5.
    by_reference = load_rewards(GrpoConfig(rewards=["length"]))[0]
    assert by_reference.score("x" * 5, "y" * 10) == 0.5 and by_reference.score("", "") == 1.0


def test_user_reward_file_is_loaded_and_checked(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def mentions_city(completion, reference):\n    return 'Denver' in completion\n\n"
                    "def broken(completion, reference):\n    return 'high'\n")
    (reward,) = load_rewards(GrpoConfig(rewards=[f"{path}:mentions_city"]))
    assert reward.name == "mentions_city" and reward.score("to Denver", ORDER) == 1.0
    (broken,) = load_rewards(GrpoConfig(rewards=[f"{path}:broken"]))
    with pytest.raises(TunesmithError, match=r"^reward .*broken returned 'high'; it must return a finite number"):
        broken.score("x", ORDER)
    with pytest.raises(TunesmithError, match=r"^train\.grpo\.rewards: .*nowhere\.py not found"):
        load_rewards(GrpoConfig(rewards=[f"{tmp_path}/nowhere.py:f"]))


@pytest.mark.parametrize("settings, message", [
    (GrpoConfig(rewards=["json_vaild"]), "unknown reward 'json_vaild'; shipped rewards are " + ", ".join(SHIPPED)),
    (GrpoConfig(rewards=["json_schema"]), "train.grpo.json_schema is unset"),
    (GrpoConfig(rewards=["regex"]), "train.grpo.regex is unset"),
    (GrpoConfig(rewards=["regex"], regex="(unclosed"), "not a valid regular expression"),
    (GrpoConfig(rewards=["json_valid"], reward_weights=[1.0, 2.0]), "2 weights for 1 rewards"),
    (GrpoConfig(rewards=[]), "train.grpo.rewards is empty"),
])
def test_bad_reward_settings_are_one_clear_error(settings, message):
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(")):
        load_rewards(settings)


def grpo_run(tmp_path: Path, tiny_config: Path, **train) -> tuple[Path, object]:
    """The tiny order run prepared for GRPO: 4 prompts x 2 answers per step, short answers."""
    from tunesmith.data.prepare import prepare

    raw = yaml.safe_load(tiny_config.read_text())
    raw["train"].update({"method": "grpo", "max_steps": 2, "learning_rate": 0.01,
                         "grpo": {"rewards": ["json_valid", "field_match", "length"], "reward_weights": [1, 1, 0.5],
                                  "num_generations": 2, "max_completion_length": 8}}, **train)
    tiny_config.write_text(yaml.safe_dump(raw))
    config = load_config(tiny_config)
    return prepare(config), config


def test_grpo_run_writes_an_adapter_and_records_the_reward_curve(tmp_path, tiny_config):
    run_dir, config = grpo_run(tmp_path, tiny_config)
    section = train_grpo(run_dir, config)

    lora_b = [t for name, t in load_file(run_dir / "adapter" / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # lora_B starts at zero: it moved
    assert (run_dir / "adapter" / "tokenizer_config.json").is_file() and not list(run_dir.glob(".adapter.tmp-*"))
    manifest = read_json(run_dir / MANIFEST)
    assert manifest["train"] == json.loads(json.dumps(section))
    assert section["method"] == "lora-grpo" and section["metrics"]["steps"] == 2
    curve = section["reward_curve"]
    assert [point["step"] for point in curve] == [1, 2]
    for point in curve:  # the weighted sum TRL optimized, from the per-reward means it logged
        assert {"reward", "reward_std", "json_valid", "field_match", "length", "flat_groups"} <= set(point)
        assert 0 < point["answer_tokens"] <= 8
        assert point["reward"] == pytest.approx(point["json_valid"] + point["field_match"] + 0.5 * point["length"],
                                                abs=1e-3)
    metrics = section["metrics"]
    assert (metrics["reward_before"], metrics["reward_after"]) == (curve[0]["reward"], curve[-1]["reward"])
    # Held-out prompts are rewarded before and after training; the random tiny model never writes JSON.
    assert metrics["validation_reward_before"] >= 0 and metrics["validation_reward_after"] >= 0
    assert section["warnings"] == []  # the length reward always differs between answers
    assert section["config"]["grpo"]["rewards"] == ["json_valid", "field_match", "length"]


@pytest.mark.parametrize("train, resume, message", [
    ({"grpo": {"rewards": ["json_valid", "nope"]}}, False, "unknown reward 'nope'"),
    ({"batch_size": 3}, False, "not a multiple of train.grpo.num_generations=2"),
    ({}, True, "--resume: .* holds no intact checkpoint"),
])
def test_bad_grpo_input_is_refused_before_training(tmp_path, tiny_config, train, resume, message):
    run_dir, config = grpo_run(tmp_path, tiny_config, **train)
    with pytest.raises(TunesmithError, match=message):
        train_grpo(run_dir, config, resume=resume)
    assert not (run_dir / "adapter").exists() and "train" not in read_json(run_dir / MANIFEST)


def test_sigterm_saves_a_checkpoint_and_resume_continues_the_reward_curve(tmp_path, tiny_config):
    run_dir, config = grpo_run(tmp_path, tiny_config, max_steps=4, checkpoint_steps=2)

    def terminate_during_step_2(progress, total_steps):
        if progress.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped) as stopped:
        train_grpo(run_dir, config, on_step=terminate_during_step_2)
    assert stopped.value.checkpoint.name == "step-00000002" and not (run_dir / "adapter").exists()
    section = train_grpo(run_dir, config, resume=True)
    assert section["resumed_from"] == "checkpoints/step-00000002" and section["metrics"]["steps"] == 4
    assert [point["step"] for point in section["reward_curve"]] == [1, 2, 3, 4]  # the trainer's history came back
    assert section["metrics"]["validation_reward_before"] is None  # the run's start is not on hand after a resume
    assert section["validation_curve"] == [] and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_shipped_grpo_example_validates():
    path = Path(__file__).parents[2] / "examples" / "grpo" / "config.yaml"
    config = load_config(path)
    assert config.train.method == "grpo" and config.data.train.is_file()
    load_rewards(config.train.grpo)


def test_rewards_that_never_differ_leave_a_warning(tmp_path, tiny_config):
    run_dir, config = grpo_run(tmp_path, tiny_config, max_steps=1,
                               grpo={"rewards": ["json_valid"], "num_generations": 2, "max_completion_length": 4})
    section = train_grpo(run_dir, config)
    assert section["reward_curve"][0]["flat_groups"] == 1.0  # 4 tokens of a random model are never a JSON object
    assert "nothing to learn from" in section["warnings"][0]
