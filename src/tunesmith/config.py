"""Typed configuration for every stage, YAML loading and `a.b=c` command-line overrides.

Each option is documented once, in the attribute docstring under it; `tunesmith options` and
docs/config.md are generated from these docstrings.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tunesmith.errors import TunesmithError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class DataConfig(_Section):
    train: Path
    """JSONL file of training examples (chat `messages`, `prompt`/`completion`, or alpaca `instruction`/`input`/`output`)."""
    validation: Path | None = None
    """Optional JSONL file of held-out examples; when absent, a slice of `train` is held out by content hash."""
    format: Literal["auto", "chat", "prompt_completion", "alpaca"] = "auto"
    """Input format; `auto` detects it from the first record and requires every line to agree."""
    validation_fraction: float = 0.15
    """Share of examples held out for validation when no `validation` file is given (0 < x < 1)."""
    max_length: int = 1024
    """Longest tokenized example (prompt + answer) kept for training; longer ones are truncated from the end."""
    system_prompt: str | None = None
    """System message prepended to examples that have none (prompt/completion and alpaca rows included)."""


class LoraConfig(_Section):
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (effective scale is alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input; 0 is fastest and fine for small datasets."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` or a list of module names such as [q_proj, v_proj]."""


class PreferenceConfig(_Section):
    beta: float = 0.1
    """DPO/KTO beta: how far the policy may move from the reference (higher stays closer)."""
    parent_run: Path | None = None
    """Earlier run directory whose adapter this run continues from and uses as the reference (else: the base model)."""


class TrainConfig(_Section):
    method: Literal["sft", "dpo", "kto"] = "sft"
    """`sft` on chat examples, or preference tuning on chosen/rejected pairs: `dpo`, or `kto` (also takes unpaired labels)."""
    epochs: float = 2.0
    """Passes over the training split."""
    learning_rate: float = 2e-4
    """Peak learning rate (AdamW), reached after warmup and decayed linearly to zero."""
    batch_size: int = 8
    """Examples per optimizer step on one device (before gradient accumulation)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    warmup_ratio: float = 0.05
    """Share of steps spent warming the learning rate up from zero."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto` uses bf16 autocast where the CPU/GPU supports it, else fp32."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides `epochs`); handy for smoke tests."""
    logging_steps: int = 5
    """Record the training loss every N optimizer steps."""
    threads: int | None = None
    """CPU threads for PyTorch; default: all physical cores."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapter settings."""
    preference: PreferenceConfig = PreferenceConfig()
    """Preference tuning settings (methods `dpo` and `kto`)."""


class EvaluateConfig(_Section):
    max_examples: int | None = None
    """Evaluate on at most this many held-out examples (all when unset)."""
    max_new_tokens: int = 128
    """Generation budget per answer; answers that hit it count as 'did not stop'."""
    batch_size: int = 16
    """Prompts generated together (left-padded batch with KV cache)."""
    json_output: bool = False
    """The task answers in JSON: report JSON validity and compare parsed objects for exact match."""
    compare_base: bool = True
    """Also evaluate the base model on the same examples, side by side."""


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    """Address the OpenAI-compatible server listens on."""
    port: int = 8000
    """Port the OpenAI-compatible server listens on."""
    max_new_tokens: int = 256
    """Default `max_tokens` when a request does not set one."""


class RunConfig(_Section):
    name: str = "run"
    """Run name; artifacts go to `<output_dir>/<name>`."""
    base_model: str = "default"
    """`default` (embedded SmolLM2-135M-Instruct), a local Hugging Face model directory, or a Hub id."""
    output_dir: Path = Path("runs")
    """Folder that holds run directories."""
    seed: int = 0
    """Seed for the split, LoRA init and data order."""
    data: DataConfig
    """Data stage settings."""
    train: TrainConfig = TrainConfig()
    """Training stage settings."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Evaluation stage settings."""
    serve: ServeConfig = ServeConfig()
    """Serving settings."""

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply `a.b=c` overrides, validate; relative data paths resolve against the YAML's folder."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"config file not found: {path} (pass the path to a YAML file such as configs/quickstart.yaml)")
    raw = _read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    _resolve_data_paths(raw, path.parent)
    return validate_config(raw, source=str(path))


def load_run_config(run_dir: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The config a run was prepared with (`<run_dir>/config.yaml`), with `a.b=c` overrides applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise TunesmithError(f"{run_dir} is not a tunesmith run directory (no config.yaml); run `tunesmith prepare CONFIG` first")
    raw = _read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise TunesmithError(f"override {item!r} is not key=value (example: train.lora.r=32)")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TunesmithError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TunesmithError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: the config must be a YAML mapping of option: value")
    return raw


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a config dict; every problem is reported with its dotted key and a hint."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe_error(err) for err in exc.errors()]
        raise TunesmithError(f"{source}: invalid config\n  " + "\n  ".join(lines)) from None


def _describe_error(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1) or [
            k for k in known if loc[-1].startswith(k) or k.startswith(loc[-1])][:1]
        hint = f"did you mean {'.'.join(loc[:-1] + close)!r}?" if close else f"known keys here: {', '.join(known)}"
        return f"{key}: unknown option; {hint}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def _known_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _resolve_data_paths(raw: dict, base: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train", "validation"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            # Relative to the YAML file's folder; fall back to the working directory where that is what exists.
            beside_yaml = base / value
            chosen = beside_yaml if beside_yaml.exists() or not Path(value).exists() else Path(value)
            data[key] = str(chosen.resolve())


def option_rows(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every option, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(option_rows(ann, f"{prefix}{name}."))
            continue
        if get_origin(ann) is Literal:
            type_name = " | ".join(str(choice) for choice in get_args(ann))
        else:
            type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "").replace("pathlib.", "")
        value = str(field.default) if isinstance(field.default, Path) else field.default
        default = "required" if field.is_required() else repr(value)
        rows.append((f"{prefix}{name}", type_name, default, field.description or ""))
    return rows


def options_markdown() -> str:
    """docs/config.md: every option, generated from the attribute docstrings above."""
    lines = ["# Config options", "", "Generated by `tunesmith options --markdown`; do not edit by hand.", "",
             "| option | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, meaning in option_rows():
        lines.append(f"| `{key}` | {type_name.replace('|', '&#124;')} | `{default}` | {meaning.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def config_to_yaml(config: RunConfig) -> str:
    """The fully resolved config, as YAML, for the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
