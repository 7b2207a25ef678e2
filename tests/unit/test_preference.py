"""DPO/KTO on a tiny model: the adapter learns the preference, is saved with its tokenizer, lineage is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tunesmith.config import config_to_yaml, load_config, validate_config
from tunesmith.data.split import dataset_hash
from tunesmith.data.template import template_fingerprint
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer
from tunesmith.registry.run_dir import MANIFEST, environment, read_json, write_json_atomic
from tunesmith.train.preference import train_preference
from tunesmith.types import ChatMessage, ChatExample

from conftest import order_rows

CITIES = ["Denver", "Lisbon", "Osaka", "Oslo"]


def preference_rows(count: int) -> list[dict]:
    """Order prompts; the chosen reply names the right city, the rejected one a wrong city."""
    rows = []
    for n, row in enumerate(order_rows(count)):
        answer = json.loads(row["messages"][1]["content"])
        wrong = dict(answer, city=CITIES[(CITIES.index(answer["city"]) + 1) % 4])
        rows.append({"messages": row["messages"][:1], "chosen": json.dumps(answer), "rejected": json.dumps(wrong)})
    return rows


def make_preference_run(tmp_path: Path, tiny_model_dir: Path, name: str = "pref", overrides: dict | None = None,
                        rows: list[dict] | None = None, kind: str = "preference") -> tuple[Path, object]:
    """A run directory as `prepare` writes it for preference data (written directly, per the types.py contract)."""
    rows = rows if rows is not None else preference_rows(24)
    train_cfg = {"method": "dpo", "max_steps": 6, "batch_size": 4, "logging_steps": 1, "precision": "fp32",
                 "learning_rate": 0.02, "lora": {"r": 4, "alpha": 8}}
    train_cfg.update(overrides or {})
    config = validate_config({"name": name, "base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "runs"),
                              "data": {"train": str(tmp_path / "unused.jsonl"), "max_length": 128}, "train": train_cfg})
    run_dir = config.run_dir
    (run_dir / "data").mkdir(parents=True)
    splits = {"train": [r for i, r in enumerate(rows) if i % 4 != 3], "validation": rows[3::4]}
    for split, part in splits.items():
        (run_dir / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    (run_dir / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")
    hashed = [ChatExample(messages=[ChatMessage(**m) for m in r["messages"]]
                          + [ChatMessage(role="assistant", content=r.get("chosen", r.get("completion", "")))]) for r in rows]
    tokenizer = load_tokenizer(tiny_model_dir)
    write_json_atomic(run_dir / MANIFEST, {
        "name": name, "base_model": {"name": str(tiny_model_dir), "source": str(tiny_model_dir)},
        "data": {"kind": kind, "train_file": "data/train.jsonl", "validation_file": "data/validation.jsonl",
                 "rows": {split: len(part) for split, part in splits.items()}, "dataset_hash": dataset_hash(hashed),
                 "chat_template_sha": template_fingerprint(tokenizer)},
        "environment": environment(),
    })
    return run_dir, config


def test_dpo_writes_an_adapter_that_prefers_the_chosen_replies(tmp_path, tiny_model_dir):
    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, overrides={"max_steps": 12})
    section = train_preference(run_dir, config)

    adapter = run_dir / "adapter"
    lora_b = [t for name, t in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # lora_B starts at zero: it moved
    assert (adapter / "tokenizer_config.json").is_file() and not (adapter / "ref").exists()
    assert not list(run_dir.glob(".adapter.tmp-*")) and not (adapter / "_trainer").exists()

    manifest = read_json(run_dir / MANIFEST)
    assert manifest["train"] == json.loads(json.dumps(section))
    metrics = section["metrics"]
    for key in ("method", "adapter_dir", "data_hash", "base_model", "config", "metrics", "loss_curve", "wall_time_s"):
        assert key in section
    assert section["method"] == "lora-dpo" and section["parent"] is None
    assert section["data_hash"] == manifest["data"]["dataset_hash"]
    assert metrics["steps"] == 12 and len(section["loss_curve"]) == 12
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0
    # The held-out pairs: the trained policy ranks the right city above the wrong one.
    assert metrics["reward_accuracy"] >= 0.8 and metrics["reward_margin"] > 0
    # DPO's loss starts at log(2) (policy == reference) and falls as the margin grows.
    assert section["loss_curve"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert metrics["validation_loss"] < 0.6


def test_dpo_with_an_sft_weight_also_learns_the_chosen_answers(tmp_path, tiny_model_dir):
    # At the first step policy == reference, so plain DPO's loss is log(2); the SFT term adds the chosen answers' NLL.
    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, overrides={"max_steps": 2,
                                                                               "preference": {"sft_weight": 1.0}})
    section = train_preference(run_dir, config)
    assert section["loss_curve"][0]["loss"] > 0.6931 + 1.0
    assert section["config"]["preference"]["sft_weight"] == 1.0


def test_dpo_rows_end_a_cut_rejected_reply_where_it_was_cut(tiny_model_dir):
    # TRL would close every rejected reply with an end of turn; after a cut one that is no mistake the model makes.
    from tunesmith.data.template import end_of_turn_token_ids, generation_prompt_ids
    from tunesmith.train.preference_data import dpo_token_rows
    from tunesmith.types import PreferenceExample

    tokenizer = load_tokenizer(tiny_model_dir)
    stops = set(end_of_turn_token_ids(tokenizer))
    prompt = [ChatMessage(role="user", content="1 red chair to Oslo")]
    chosen = '{"city": "Oslo"}'
    whole, cut = dpo_token_rows(tokenizer, [
        PreferenceExample(messages=prompt, chosen=chosen, rejected='{"city": "Osaka"}'),
        PreferenceExample(messages=prompt, chosen=chosen, rejected='{"city": "Osaka', rejected_cut=True)])
    assert whole["prompt_ids"] == generation_prompt_ids(tokenizer, [m.as_dict() for m in prompt])
    assert tokenizer.decode(whole["chosen_ids"][:-1]) == chosen and whole["chosen_ids"][-1] in stops
    assert whole["rejected_ids"][-1] in stops
    assert tokenizer.decode(cut["rejected_ids"]) == '{"city": "Osaka' and not set(cut["rejected_ids"]) & stops
    assert cut["chosen_ids"] == whole["chosen_ids"]


def test_kto_trains_from_paired_and_unpaired_data(tmp_path, tiny_model_dir):
    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, overrides={"method": "kto", "max_steps": 3})
    section = train_preference(run_dir, config)
    assert section["method"] == "lora-kto" and section["metrics"]["steps"] == 3
    assert "reward_margin" in section["metrics"] and "kl" in section["metrics"]

    unpaired = [{"messages": r["messages"], "completion": r[key], "label": key == "chosen"}
                for r in preference_rows(12) for key in ("chosen", "rejected")]
    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, name="kto-unpaired", rows=unpaired,
                                          kind="unpaired_preference", overrides={"method": "kto", "max_steps": 2})
    assert train_preference(run_dir, config)["metrics"]["steps"] == 2


def test_dpo_continues_from_an_sft_run_and_records_the_parent(tmp_path, tiny_model_dir, tiny_config):
    from tunesmith.data.prepare import prepare
    from tunesmith.train.sft import train_sft

    sft_config = load_config(tiny_config)
    sft_dir = prepare(sft_config)
    train_sft(sft_dir, sft_config)
    sft_weights = load_file(sft_dir / "adapter" / "adapter_model.safetensors")

    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, overrides={"max_steps": 3, "init_from": str(sft_dir)})
    section = train_preference(run_dir, config)
    parent = section["parent"]
    assert parent["run_dir"] == str(sft_dir.resolve()) and parent["name"] == "tiny"
    assert parent["method"] == read_json(sft_dir / MANIFEST)["train"]["method"]
    assert parent["data_hash"] == read_json(sft_dir / MANIFEST)["data"]["dataset_hash"]
    # The reference is the parent policy, so DPO starts at exactly log(2) even though the adapter is not zero.
    assert section["loss_curve"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    # Same adapter layout as the parent (its rank, not train.lora.r), and the weights moved on from it.
    dpo_weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert set(dpo_weights) == set(sft_weights)
    assert any((dpo_weights[k] - sft_weights[k]).abs().max() > 0 for k in sft_weights)


def test_preference_run_is_evaluated_and_served_like_an_sft_run(tmp_path, tiny_model_dir):
    from tunesmith.evaluate.run import evaluate_run
    from tunesmith.serve.engine import ServingEngine

    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, overrides={"max_steps": 1})
    train_preference(run_dir, config)
    engine = ServingEngine.from_run_dir(run_dir, default_max_tokens=4)
    assert engine.adapter_name == "pref"

    config = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={
        "max_examples": 2, "max_new_tokens": 4, "general_check": False, "bootstrap_samples": 50})})
    report = evaluate_run(run_dir, config)
    assert set(report["results"]) == {"base", "fine-tuned"} and report["examples"] == 2
    assert "evaluate" in read_json(run_dir / MANIFEST)


@pytest.mark.parametrize("case, message", [
    ("sft-data", "needs preference data"),
    ("kind", "needs preference data"),
    ("parent-missing", "not a tunesmith run directory"),
    ("parent-untrained", "has not been trained yet"),
])
def test_bad_preference_input_is_one_clear_error(tmp_path, tiny_model_dir, case, message):
    overrides = {"max_steps": 1}
    run_dir, config = make_preference_run(tmp_path, tiny_model_dir, overrides=overrides,
                                          kind="unpaired_preference" if case == "kind" else "preference")
    if case == "sft-data":
        manifest = read_json(run_dir / MANIFEST)
        del manifest["data"]["kind"]
        write_json_atomic(run_dir / MANIFEST, manifest)
    if case.startswith("parent"):
        parent = tmp_path / "nowhere" if case == "parent-missing" else run_dir
        config = validate_config({**config.model_dump(mode="json"),
                                  "train": {**config.train.model_dump(mode="json"), "init_from": str(parent)}})
    with pytest.raises(TunesmithError, match=message):
        train_preference(run_dir, config)
    assert not (run_dir / "adapter").exists() and "train" not in read_json(run_dir / MANIFEST)


def test_shipped_preference_example_validates():
    path = Path(__file__).parents[2] / "examples" / "preference" / "config.yaml"
    config = load_config(path)
    assert config.train.method == "dpo" and config.data.train.is_file()
    assert yaml.safe_load(path.read_text())["train"]["method"] == "dpo"
