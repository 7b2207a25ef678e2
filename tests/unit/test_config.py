"""Config loading: shipped YAMLs load, overrides are typed, mistakes name the dotted key, docs never drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.config import load_config, load_run_config, option_rows, options_markdown
from tunesmith.errors import TunesmithError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("examples/**/config.yaml")])


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def config_path(tmp_path) -> Path:
    return write_yaml(tmp_path / "config.yaml", {"name": "t", "data": {"train": "train.jsonl"},
                                                 "train": {"batch_size": 4, "lora": {"r": 8}}})


def load_error(path, overrides=()) -> str:
    with pytest.raises(TunesmithError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_shipped_configs_exist():
    assert SHIPPED, "no configs/*.yaml or examples/**/config.yaml found"


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = load_config(path)
    assert config.name == raw["name"]
    assert config.data.train.is_absolute()
    assert config.data.train == (path.parent / raw["data"]["train"]).resolve()


def test_yaml_values_are_loaded_and_defaults_filled(config_path):
    config = load_config(config_path)
    assert config.name == "t"
    assert config.train.batch_size == 4
    assert config.train.lora.r == 8
    assert config.train.lora.alpha == 32  # default
    assert config.data.format == "auto"


def test_overrides_parse_to_typed_values(config_path):
    config = load_config(config_path, ["train.lora.r=32", "train.lora.target_modules=[q_proj,v_proj]",
                                       "train.learning_rate=1e-3", "evaluate.json_output=true", "train.max_steps="])
    assert config.train.lora.r == 32
    assert config.train.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.evaluate.json_output is True
    assert config.train.max_steps is None
    assert config.train.batch_size == 4  # untouched by unrelated overrides


def test_override_creates_a_missing_section(config_path):
    config = load_config(config_path, ["serve.port=9001"])
    assert config.serve.port == 9001


def test_override_wins_over_yaml_and_later_override_wins(config_path):
    assert load_config(config_path, ["train.lora.r=4", "train.lora.r=64"]).train.lora.r == 64


@pytest.mark.parametrize("override, dotted, suggestion", [
    ("nmae=x", "nmae", "did you mean 'name'"),
    ("train.batchsize=2", "train.batchsize", "did you mean 'train.batch_size'"),
    ("train.lora.alpah=4", "train.lora.alpah", "did you mean 'train.lora.alpha'"),
])
def test_unknown_key_names_the_dotted_key_and_suggests_a_fix(config_path, override, dotted, suggestion):
    message = load_error(config_path, [override])
    assert f"{dotted}: unknown option" in message
    assert suggestion in message
    assert str(config_path) in message


def test_unknown_key_without_a_close_match_lists_the_known_keys(config_path):
    message = load_error(config_path, ["train.lora.zzz=4"])
    assert "train.lora.zzz: unknown option" in message
    assert "known keys here: r, alpha, dropout, target_modules" in message


def test_rank_suggests_r(config_path):
    assert "did you mean 'train.lora.r'" in load_error(config_path, ["train.lora.rank=4"])


def test_unknown_key_in_the_yaml_file_is_reported_too(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": "t.jsonl", "validaton": "v.jsonl"}})
    message = load_error(path)
    assert "data.validaton: unknown option" in message
    assert "did you mean 'data.validation'" in message


def test_wrong_type_names_the_dotted_key_and_value(config_path):
    message = load_error(config_path, ["train.batch_size=abc"])
    assert "train.batch_size:" in message
    assert "'abc'" in message


def test_every_problem_is_reported_at_once(config_path):
    message = load_error(config_path, ["train.batch_size=abc", "nmae=x"])
    assert "train.batch_size:" in message and "nmae: unknown option" in message


@pytest.mark.parametrize("override", ["train.lora.r", "=3"])
def test_override_without_key_value_syntax_is_rejected(config_path, override):
    message = load_error(config_path, [override])
    assert repr(override) in message
    assert "key=value" in message


def test_override_into_a_scalar_is_rejected(config_path):
    message = load_error(config_path, ["name.first=x"])
    assert "'name' is not a section" in message


def test_missing_config_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    message = load_error(path)
    assert "config file not found" in message and str(path) in message


def test_a_directory_instead_of_a_config_file_says_so(tmp_path):
    message = load_error(tmp_path)
    assert "is a directory" in message and "config YAML file" in message and "not found" not in message


def test_the_missing_config_hint_names_files_that_exist():
    message = load_error(ROOT / "nope.yaml")
    named = [word.strip("(),") for word in message.split() if word.strip("(),").endswith((".yaml", ".yml"))]
    assert named[1:] and all((ROOT / name).is_file() for name in named[1:]), message


@pytest.mark.parametrize("override", [
    "train.epochs=-1", "train.epochs=0", "train.batch_size=0", "train.grad_accum=0", "train.learning_rate=-0.001",
    "train.lora.r=0", "train.lora.alpha=-8", "train.lora.dropout=1", "train.warmup_ratio=1.5", "train.max_steps=-1",
    "train.logging_steps=0", "train.keep_checkpoints=0", "train.preference.beta=0", "data.max_length=0",
    "data.near_duplicate_threshold=1.5", "data.replay.max_new_tokens=0", "evaluate.max_new_tokens=0",
    "evaluate.batch_size=0", "evaluate.confidence=1.5", "evaluate.bootstrap_samples=0", "serve.port=70000",
    "serve.max_new_tokens=0",
])
def test_numbers_outside_their_range_are_rejected_with_the_dotted_key(config_path, override):
    key = override.partition("=")[0]
    message = load_error(config_path, [override])
    assert f"{key}:" in message and ("greater than" in message or "less than" in message), message


@pytest.mark.parametrize("override", ["train.max_steps=0", "train.checkpoint_steps=0", "train.warmup_ratio=0",
                                      "train.lora.dropout=0", "evaluate.show_differences=0", "data.preflight_examples=0"])
def test_zero_stays_valid_where_it_means_off(config_path, override):
    load_config(config_path, [override])


def test_invalid_yaml_names_the_path_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: ok\ntrain: 1\n  bad: indent\n", encoding="utf-8")
    message = load_error(path)
    assert f"{path}:3: not valid YAML" in message
    assert "fix the syntax" in message


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    assert "must be a YAML mapping" in load_error(path)


def test_relative_data_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text("{}\n", encoding="utf-8")
    path = write_yaml(project / "config.yaml", {"data": {"train": "data/train.jsonl", "validation": "val.jsonl"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(path)
    assert config.data.train == (project / "data" / "train.jsonl").resolve()
    # A file that does not exist yet still resolves beside the YAML, not the working directory.
    assert config.data.validation == (project / "val.jsonl").resolve()


def test_reward_schema_reward_files_and_replay_file_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    path = write_yaml(project / "config.yaml", {
        "data": {"train": "t.jsonl", "replay": {"source": "general.jsonl"}},
        "train": {"method": "grpo", "grpo": {"rewards": ["json_valid", "mine.py:score", "pkg.mod:score"],
                                              "json_schema": "schema.json"}}})
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.data.replay.source == (project / "general.jsonl").resolve()
    assert config.train.grpo.json_schema == (project / "schema.json").resolve()
    assert config.train.grpo.rewards == ["json_valid", f"{(project / 'mine.py').resolve()}:score", "pkg.mod:score"]
    assert load_config(path, ["data.replay.source=self_distill"]).data.replay.source == "self_distill"


def test_absolute_data_paths_are_kept(tmp_path):
    target = tmp_path / "abs" / "train.jsonl"
    (tmp_path / "sub").mkdir()
    path = write_yaml(tmp_path / "sub" / "c.yaml", {"data": {"train": str(target)}})
    assert load_config(path).data.train == target


def test_docs_config_md_is_generated_from_the_options():
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == options_markdown(), (
        "docs/config.md is stale; regenerate it with `tunesmith options --markdown > docs/config.md`"
    )


def test_every_option_has_a_description_and_appears_in_the_docs():
    rows = option_rows()
    keys = [key for key, *_ in rows]
    assert {"data.train", "train.lora.r", "train.lora.target_modules", "serve.port"} <= set(keys)
    assert len(keys) == len(set(keys))
    markdown = options_markdown()
    for key, _type, _default, description in rows:
        assert description.strip(), f"{key} has no description"
        assert f"| `{key}` |" in markdown


@pytest.mark.parametrize("columns", ["80", "120", "200"])
def test_options_never_cut_an_option_name_short(columns):
    import re

    from typer.testing import CliRunner

    from tunesmith.cli.main import app

    result = CliRunner().invoke(app, ["options"], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    for key, *_ in option_rows():
        assert re.search(rf"(^|[\s│]){re.escape(key)}[\s│]", result.output, re.M), f"{key} is cut at {columns} columns"
    assert "[q_proj," in result.output  # shown as written, not read as markup


def test_load_run_config_reads_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_yaml(run_dir / "config.yaml", {"name": "r1", "data": {"train": str(tmp_path / "t.jsonl")},
                                         "train": {"lora": {"r": 4}}})
    config = load_run_config(run_dir, ["train.lora.r=12"])
    assert config.name == "r1"
    assert config.train.lora.r == 12


def test_load_run_config_without_config_yaml_is_an_error(tmp_path):
    with pytest.raises(TunesmithError) as info:
        load_run_config(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "no config.yaml" in str(info.value)


def test_load_run_config_reports_invalid_options_with_the_path(tmp_path):
    write_yaml(tmp_path / "config.yaml", {"data": {"train": "t.jsonl"}, "train": {"batch_size": "x"}})
    with pytest.raises(TunesmithError) as info:
        load_run_config(tmp_path)
    assert str(tmp_path / "config.yaml") in str(info.value)
    assert "train.batch_size:" in str(info.value)


def test_load_run_config_with_invalid_yaml_is_a_tunesmith_error(tmp_path):
    (tmp_path / "config.yaml").write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(TunesmithError):
        load_run_config(tmp_path)
