"""Resumable checkpoints written atomically: a temporary folder, fsync, a completeness marker, then a rename.

A checkpoint counts only if its `COMPLETE` marker exists, so a process killed mid-write leaves nothing that
`--resume` would pick up; the newest complete one wins and only the last K are kept. Each records the sha256 of
every file it wrote (`files.json`); a checkpoint damaged later is skipped for the previous intact one.
SFT writes its own files (`write_checkpoint`); TRL trainers add their trainer's folder (see `trl_footing`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tunesmith.config import TrainConfig
from tunesmith.errors import TunesmithError
from tunesmith.registry.hashing import file_sha256, folder_manifest
from tunesmith.registry.run_dir import apply_umask, fsync_path, fsync_tree

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"
CONFIG_FILE = "config.json"
HASHES_FILE = "files.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / checkpoint_name(step)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint(run_dir: Path, step: int, weights: dict, state: dict, progress: dict, config: dict,
                     keep: int) -> Path:
    """Write one SFT checkpoint atomically and delete all but the newest `keep` complete ones."""
    import torch
    from safetensors.torch import save_file

    with staged_checkpoint(run_dir, step, keep) as staging:
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()},
                  str(staging / WEIGHTS_FILE))
        torch.save(state, staging / STATE_FILE)
        write_progress_and_config(staging, progress, config)
    return checkpoint_path(run_dir, step)


def write_progress_and_config(folder: Path, progress: dict, config: dict) -> None:
    """The loop progress and the train settings a checkpoint resumes with (every trainer writes both)."""
    (folder / PROGRESS_FILE).write_text(json.dumps(progress, indent=1), encoding="utf-8")
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")


@contextmanager
def staged_checkpoint(run_dir: Path, step: int, keep: int):
    """A temporary folder to fill with one checkpoint; when the block succeeds its files are hashed (`files.json`),
    fsynced, marked complete and renamed to `step-N`, then all but the newest `keep` are deleted."""
    final = checkpoint_path(run_dir, step)
    folder = final.parent
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{final.name}.tmp-"))
    try:
        apply_umask(staging, directory=True)
        yield staging
        (staging / HASHES_FILE).write_text(json.dumps(folder_manifest(staging), indent=1), encoding="utf-8")
        fsync_tree(staging)
        (staging / COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
        fsync_path(staging / COMPLETE_MARKER)
        fsync_path(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_path(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    prune_checkpoints(run_dir, keep)


def checkpoint_problem(path: Path) -> str | None:
    """Why a complete checkpoint cannot be trusted (a file missing or changed since it was written), or None.

    Every file `files.json` names is checked (a TRL trainer's state folder included); without it, SFT's four."""
    hashes_path = path / HASHES_FILE
    try:
        expected = json.loads(hashes_path.read_text(encoding="utf-8")) if hashes_path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{HASHES_FILE} is damaged"
    for name in expected or (WEIGHTS_FILE, STATE_FILE, PROGRESS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            return f"{name} is missing"
        if expected is not None and file_sha256(path / name) != expected[name]:
            return f"{name} changed since it was written (sha256 mismatch)"
    return None


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint whose files check out, and a note for each newer one that was skipped."""
    skipped = []
    for path in reversed(complete_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


def resume_point(run_dir: Path, resume: bool, restart: bool) -> Path | None:
    """The newest intact checkpoint when resuming (damaged newer ones are skipped, and said so); None otherwise.

    Checkpoints of an earlier attempt are continued (`resume`) or deleted (`restart`), never dropped silently."""
    if not resume:
        existing = complete_checkpoints(run_dir)
        if existing and not restart:
            raise TunesmithError(f"{run_dir / CHECKPOINTS_DIR} holds checkpoints of an earlier attempt (newest "
                                 f"{existing[-1].name}); continue it with --resume, or delete them and start over "
                                 "with --restart")
        return None
    checkpoint, skipped = newest_intact_checkpoint(run_dir)
    for note in skipped:
        print(f"warning: checkpoint {note}; trying an earlier one", file=sys.stderr)
    if checkpoint is None:
        damaged = f" (damaged: {'; '.join(skipped)})" if skipped else ""
        raise TunesmithError(f"--resume: {run_dir / CHECKPOINTS_DIR} holds no intact checkpoint{damaged}; "
                             f"start over with --restart")
    return checkpoint


def settings_of(checkpoint: Path, current: TrainConfig) -> TrainConfig:
    """A resumed run continues with the settings it started with (overrides included); only `threads` may change."""
    saved = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    return TrainConfig.model_validate({**saved, "threads": current.threads})


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(trainable weights, optimizer/scheduler/RNG state, progress) of a complete SFT checkpoint."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / WEIGHTS_FILE))
    state = torch.load(path / STATE_FILE, weights_only=True)
    progress = json.loads((path / PROGRESS_FILE).read_text(encoding="utf-8"))
    return weights, state, progress


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep`, and leftovers of interrupted writes."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    for stale in folder.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in complete_checkpoints(run_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)

