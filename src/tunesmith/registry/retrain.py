"""A registered version as the parent of a retrain: the rows it was made from, the child's data mix and config,
and the child's held-out scores split into the parent's old held-out rows and the new data's.

The registry snapshot keeps a version's validation split but not its training split (it can be large); the
training split is found in the run directory it was registered from, or rebuilt by the data stage from the
config's source files and checked against the hash the version recorded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tunesmith.config import RunConfig, load_run_config, validate_config
from tunesmith.errors import TunesmithError
from tunesmith.registry.run import Run
from tunesmith.registry.run_dir import MANIFEST, write_text_atomic

OLD, NEW = "old", "new"
PREDICTIONS = "eval/predictions.jsonl"


@dataclass(frozen=True)
class VersionRun:
    """A registered version and its verified local run directory."""

    name: str
    version: str
    run_dir: Path

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"


def version_run(registry, reference: str) -> VersionRun:
    """`orders@production` (or `orders@3`) as a version with its verified local copy."""
    name, version = registry.resolve(reference)
    return VersionRun(name, version, registry.local_copy(name, version))


def training_split(run_dir: Path, scratch: Path) -> Path:
    """The file holding the run's training split: its own, the one in the run directory it was registered from
    (same content hash), or one the data stage rebuilds into `scratch` from the config's source files."""
    run = Run.open(run_dir)
    data = run.manifest.data
    own = Path(run_dir) / data.train_file
    if own.is_file():
        return own
    config = load_run_config(run_dir)
    original = Path(config.run_dir)
    return _original_split(original, data) or _rebuilt_training_split(run, config, original, scratch)


def _original_split(original: Path, data) -> Path | None:
    """The training split in the run directory a version was registered from, while it still holds that run."""
    if not (original / MANIFEST).is_file():
        return None
    try:
        other = Run.open(original).manifest.data
    except TunesmithError:
        return None  # since overwritten by something else: not this version's data
    same = _same_split((other.train_hash, other.dataset_hash), (data.train_hash, data.dataset_hash))
    return original / other.train_file if same and (original / other.train_file).is_file() else None


def _same_split(one: tuple[str | None, str], other: tuple[str | None, str]) -> bool:
    """Two (train hash, dataset hash) pairs name the same training split (older runs record no train hash)."""
    (train, dataset), (other_train, other_dataset) = one, other
    return train == other_train if train and other_train else dataset == other_dataset


def _rebuilt_training_split(run: Run, config: RunConfig, original: Path, scratch: Path) -> Path:
    from tunesmith.data.prepare import TRAIN_FILE, prepare_data
    from tunesmith.models import load_tokenizer

    sources = [Path(config.data.train), *(Path(s.path) for s in config.data.sources)]
    sources += [Path(config.data.validation)] if config.data.validation else []
    missing = [str(path) for path in sources if not path.exists()]
    if missing:
        raise TunesmithError(f"the training split of {run.directory} is not kept in the registry, its run directory "
                             f"{original} is gone, and its source files are missing ({', '.join(missing)}); restore "
                             "them, or give the rows yourself (from-logs: --against FILE; retrain: --replay 0)")
    scratch.mkdir(parents=True, exist_ok=True)
    section = prepare_data(config, load_tokenizer(run.base_source), scratch)
    recorded = run.manifest.data
    if not _same_split((section["train_hash"], section["dataset_hash"]), (recorded.train_hash, recorded.dataset_hash)):
        raise TunesmithError(f"the source files of {run.directory} ({', '.join(map(str, sources))}) changed since it "
                             "was trained: the data stage no longer makes the same training split from them; "
                             "restore them, or give the rows yourself (from-logs: --against FILE; retrain: --replay 0)")
    return scratch / TRAIN_FILE


def version_rows(run_dir: Path, scratch: Path) -> list[Path]:
    """Every row a version was trained and validated on, as data files: its training and validation splits."""
    run = Run.open(run_dir)
    return [training_split(run_dir, scratch), Path(run_dir) / run.manifest.data.validation_file]


# --- the child's data and config ---------------------------------------------------------------------------------

@dataclass
class RetrainPlan:
    """What a retrain trains on and how: every file it will write, before anything is written."""

    parent: VersionRun
    start_config: RunConfig
    config: RunConfig
    """The child's config; its data paths point into `inputs_dir`, and `train.init_from` at the parent."""
    inputs_dir: Path
    new_train: list[str]
    new_held_out: list[str]
    old_held_out: list[str]
    replay_file: Path | None
    replay_rows: int
    """Distinct rows in the parent's training split."""
    replay: float

    @property
    def expected_replay_rows(self) -> int:
        """About how many of the parent's training rows the child trains on (the data stage keeps a `replay` share of
        the distinct rows, chosen by content hash)."""
        return round(self.replay_rows * self.replay)


def plan_retrain(parent: VersionRun, start_config: RunConfig, new_data: Path, replay: float, held_out: float,
                 child_name: str | None = None, scratch: Path | None = None) -> RetrainPlan:
    """The child's data mix (new rows, a `replay` share of the parent's training split as a weighted source) and its
    validation (the parent's held-out split plus a `held_out` slice of the new rows), and its config.

    `scratch`: where the parent's training split is rebuilt when no copy of it is found (default: the inputs folder)."""
    if replay < 0:
        raise TunesmithError(f"--replay {replay}: give the share of the parent's training rows to mix in, 0 or more "
                             "(0.5 keeps half of them, 2 repeats each twice)")
    if not 0 < held_out < 1:
        raise TunesmithError(f"--held-out {held_out}: give the share of the new rows held out for evaluation, "
                             "between 0 and 1 (such as 0.2)")
    parent_run = Run.open(parent.run_dir)
    parent_data = parent_run.manifest.data
    if start_config.train.method != "sft":
        raise TunesmithError(f"train.method={start_config.train.method}: retrain continues a version with SFT on new "
                             "rows; set train.method=sft (train preference pairs with `tunesmith run`)")
    if parent_data.kind != "sft":
        raise TunesmithError(f"{parent.reference} was trained on preference data; retrain continues SFT versions "
                             "(train preference pairs with `tunesmith run` and train.method=dpo)")
    _check_same_base(parent, parent_run, start_config)
    new_train, new_held_out = split_new_rows(new_data, held_out, start_config.seed)
    name = child_name or f"{parent.name}-retrain-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    inputs_dir = (Path(start_config.output_dir) / f"{name}.inputs").resolve()
    replay_file = training_split(parent.run_dir, scratch or inputs_dir / "parent-train") if replay else None
    raw = start_config.model_dump(mode="json")
    raw.update(name=name)
    raw["data"].update(train=str(inputs_dir / "new-train.jsonl"), validation=str(inputs_dir / "held-out.jsonl"),
                       sources=[{"path": str(Path(replay_file).resolve()), "weight": replay}] if replay_file else [])
    raw["train"]["init_from"] = str(Path(parent.run_dir).resolve())
    raw["registry"].update(name=None, promote_to=None)  # retrain registers and promotes by itself, behind its gates
    config = validate_config(raw, source=f"the retrain config of {parent.reference}")
    return RetrainPlan(parent, start_config, config, inputs_dir, new_train, new_held_out,
                       _lines(parent.run_dir / parent_data.validation_file), replay_file,
                       len(set(_lines(replay_file))) if replay_file else 0, replay)


def _check_same_base(parent: VersionRun, parent_run: Run, start_config: RunConfig) -> None:
    """The child continues the parent's adapter, so it must load the same base model (checked before writing)."""
    from tunesmith.models import resolve_base_model

    child_base = str(resolve_base_model(start_config.base_model))
    if child_base != parent_run.base_source:
        raise TunesmithError(f"base_model {start_config.base_model!r} loads {child_base}, but {parent.reference} was "
                             f"trained on {parent_run.base_source}; retrain continues the parent's weights, so pass "
                             f"base_model={parent_run.base_source}")


def split_new_rows(path: Path, held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """The new SFT rows as data-stage JSON lines, split by content hash into train and held out (one each at least)."""
    from tunesmith.data.formats import read_examples
    from tunesmith.data.split import content_hash, split_bucket
    from tunesmith.types import ChatExample

    examples = read_examples(Path(path))
    if not all(isinstance(example, ChatExample) for example in examples):
        raise TunesmithError(f"{path} holds preference rows; retrain trains on SFT rows (from-logs --use corrected,"
                             "approved); train pairs with `tunesmith run` and train.method=dpo")
    if len(examples) < 2:
        raise TunesmithError(f"{path} has {len(examples)} row; retrain needs at least 2 (one to train on, one held "
                             "out to check the new version on); collect more feedback")
    buckets = [split_bucket(content_hash(example), seed) for example in examples]
    order = sorted(range(len(examples)), key=buckets.__getitem__)
    count = min(max(1, sum(bucket < held_out for bucket in buckets)), len(examples) - 1)
    held = set(order[:count])
    lines = [json.dumps(e.model_dump(exclude={"source_line"}, exclude_none=True), ensure_ascii=False) for e in examples]
    return ([line for n, line in enumerate(lines) if n not in held], [line for n, line in enumerate(lines) if n in held])


def write_inputs(plan: RetrainPlan) -> None:
    """Write the new training rows and the combined held-out file the child's config names (atomically)."""
    # Old and new held-out rows interleaved in a fixed pseudo-random order, so evaluate.max_examples samples both.
    held_out = sorted(plan.old_held_out + plan.new_held_out, key=lambda line: hashlib.sha256(line.encode()).digest())
    write_text_atomic(Path(plan.config.data.train), "".join(line + "\n" for line in plan.new_train))
    write_text_atomic(Path(plan.config.data.validation), "".join(line + "\n" for line in held_out))


def _lines(path: Path) -> list[str]:
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def config_diff(before: RunConfig, after: RunConfig) -> list[tuple[str, object, object]]:
    """(dotted key, before, after) for every option the child's config changes."""
    old, new = _flat(before.model_dump(mode="json")), _flat(after.model_dump(mode="json"))
    return [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def _flat(value: dict, prefix: str = "") -> dict:
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            flat.update(_flat(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


# --- old vs new held-out rows --------------------------------------------------------------------------------------

def held_out_subsets(run_dir: Path, parent_dir: Path) -> dict[int, str]:
    """Line of the child's validation split -> `old` (a row the parent held out) or `new` (from the new data)."""
    from tunesmith.data.prepare import read_split
    from tunesmith.data.split import content_hash

    old_content = {content_hash(example) for example in read_split(parent_dir, "validation")}
    return {example.source_line: OLD if content_hash(example) in old_content else NEW
            for example in read_split(run_dir, "validation")}


def held_out_scores(run_dir: Path, parent_dir: Path, metric: str) -> dict[str, dict[str, list[float]]]:
    """Per-example `metric` of every evaluated model, split into the parent's old held-out rows and the new ones
    (read from the evaluation's predictions, which keep `exact_match` and `token_f1` per example)."""
    subset_of_line = held_out_subsets(run_dir, parent_dir)
    scores: dict[str, dict[str, list[float]]] = {OLD: {}, NEW: {}}
    with (Path(run_dir) / PREDICTIONS).open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            for label, answer in row.items():
                if isinstance(answer, dict) and metric in answer:
                    scores[subset_of_line[row["line"]]].setdefault(label, []).append(float(answer[metric]))
    return scores
