"""What a registered version records about its origin, and the snapshot of the run it is made from."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from tunesmith.records import CodeVersion, Lineage
from tunesmith.registry.hashing import file_sha256, sha256_of_mapping
from tunesmith.registry.run import EVAL_REPORT, Run
from tunesmith.registry.run_dir import MANIFEST

# What a version keeps of its run: enough to evaluate, serve, export and explain it (not the training split,
# which can be large; its hash is in the lineage).
SNAPSHOT_FILES = (MANIFEST, "config.yaml", "data/card.md", "data/card.html", "data/validation.jsonl",
                  "data/preflight.json", EVAL_REPORT, "eval/report.md", "eval/report.html", "eval/predictions.jsonl",
                  "eval/general.json")


def content_id(run: Run, weights_sha256: str) -> str:
    """A version's identity: the same weights, training config and data register as the same version."""
    trained = run.trained
    identity = {"weights": weights_sha256, "config": trained.config, "data": run.manifest.data.dataset_hash,
                "base_model": run.manifest.base_model.name}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def write_snapshot(run: Run, target: Path) -> Path:
    """Copy what the version keeps of the run into `target` (a run directory layout)."""
    for name in SNAPSHOT_FILES:
        source = run.directory / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    shutil.copytree(run.weights_dir, target / run.trained.weights_subdir,
                    ignore=shutil.ignore_patterns(".*"))
    return target


def build_lineage(run: Run, model: str, content: str, weights_sha256: str, files_sha256: str,
                  parent_version: str | None) -> Lineage:
    trained = run.trained
    data = run.manifest.data
    evaluation = None
    if (run.directory / EVAL_REPORT).is_file():
        report = run.evaluation_report()
        evaluation = {"examples": report.examples, "results": report.results, "intervals": report.intervals,
                      "confidence": report.confidence, "gates": [g.model_dump() for g in report.gates],
                      "passed": report.passed, "overfitting": report.overfitting,
                      "comparisons": {label: c.get("metrics", {}) for label, c in report.comparisons.items()}}
    parent = trained.parent.model_dump(exclude_none=True) if trained.parent else None
    if parent is not None and parent_version:
        parent["version"] = parent_version
    return Lineage(
        model=model, run_name=run.name, content_id=content, weights_sha256=weights_sha256, files_sha256=files_sha256,
        data={"dataset_hash": data.dataset_hash, "train_hash": data.train_hash, "validation_hash": data.validation_hash,
              "kind": data.kind, "rows": data.rows, "accounting": data.accounting, "card": data.card,
              "sources": getattr(data, "sources", None), "tokens": data.tokens},
        base_model={**run.manifest.base_model.model_dump(), "weights_sha256": base_weights_hash(run.base_source)},
        config=run.config_dict(), train=trained.model_dump(mode="json", exclude={"loss_curve", "validation_curve"}),
        code=code_version(), environment=run.manifest.environment, parent=parent, evaluation=evaluation,
        registered_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def base_weights_hash(source: str) -> str | None:
    """sha256 over the base model's weight files when it is a local folder (a Hub id is named, not hashed)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    return sha256_of_mapping({path.name: file_sha256(path) for path in weights}) if weights else None


def code_version() -> CodeVersion:
    """tunesmith's version, and the git commit of its source when it runs from a checkout."""
    try:
        version = metadata.version("tunesmith")
    except metadata.PackageNotFoundError:
        version = None
    source = Path(__file__).resolve().parents[3]
    commit = dirty = None
    if (source / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
            status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return CodeVersion(tunesmith=version, git_commit=commit, git_dirty=dirty)
