"""`register`: a trained run becomes an immutable, content-addressed version in the registry."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.records import VersionInfo
from tunesmith.registry.hashing import folder_manifest, sha256_of_mapping
from tunesmith.registry.lineage import build_lineage, content_id, write_snapshot
from tunesmith.registry.model_card import model_card
from tunesmith.registry.run import Run
from tunesmith.registry.store import (COMPLETE_TAG, CONTENT_TAG, FILES, FILES_TAG, LINEAGE, SNAPSHOT, Registry,
                                      parse_reference)
from tunesmith.registry.tracking import track_run


def register_run(registry: Registry, run_dir: Path, name: str | None = None) -> tuple[VersionInfo, bool]:
    """(the version, whether it is new). The same weights, config and data registered again give the same version;
    a failure part-way leaves nothing registered."""
    run = Run.open(run_dir)
    name = name or run.name
    if parse_reference(name) != (name, None):
        raise TunesmithError(f"--name {name!r}: give a model name such as orders (no @VERSION or /VERSION)")
    weights = run.verify_weights()
    content = content_id(run, weights)
    existing = registry.find_by_content(content, name)
    if existing:
        return registry.version_info(name, str(existing[0].version)), False

    with tempfile.TemporaryDirectory(prefix="tunesmith-register-") as scratch:
        snapshot = write_snapshot(run, Path(scratch) / SNAPSHOT)
        files = folder_manifest(snapshot)
        parent_version = _parent_version(registry, run)
        lineage = build_lineage(run, name, content, weights, sha256_of_mapping(files), parent_version)
        run_id = track_run(registry, run, tags={"tunesmith.model": name, CONTENT_TAG: content})
        client = registry.client
        created_version = None
        try:
            with registry.errors():
                client.log_artifacts(run_id, str(snapshot), SNAPSHOT)
                client.log_dict(run_id, files, FILES)
                client.log_text(run_id, lineage.model_dump_json(indent=2), LINEAGE)
                created_version = registry.create_version(name, run_id, tags={
                    CONTENT_TAG: content, FILES_TAG: lineage.files_sha256, "tunesmith.run_name": run.name,
                    "tunesmith.data_hash": run.manifest.data.dataset_hash, "tunesmith.base_model": run.base_source,
                    "tunesmith.parent_version": parent_version or ""})
                card = model_card(lineage, created_version, _data_card(run))
                client.log_text(run_id, card, "README.md")
                client.set_model_version_tag(name, created_version, COMPLETE_TAG, "true")
        except BaseException:
            _undo(registry, name, created_version)
            raise
    return registry.version_info(name, created_version), True


def _parent_version(registry: Registry, run: Run) -> str | None:
    """`model@version` of the parent run (`train.init_from`) when that run was registered."""
    parent = run.trained.parent
    if parent is None or not Path(parent.run_dir).is_dir():
        return None
    try:
        parent_run = Run.open(parent.run_dir)
        found = registry.find_by_content(content_id(parent_run, parent_run.verify_weights()))
    except TunesmithError:
        return None
    return f"{found[0].name}@{found[0].version}" if found else None


def _data_card(run: Run) -> str | None:
    path = run.directory / run.manifest.data.card
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _undo(registry: Registry, name: str, version: str | None) -> None:
    """Remove a version whose registration did not finish, so nothing half-registered is ever resolved."""
    if version is None:
        return
    try:
        registry.client.delete_model_version(name, version)
    except Exception:  # noqa: BLE001 - best effort while another error is already on its way to the user
        pass


def card_text(registry: Registry, name: str, version: str) -> str:
    info = registry.version_info(name, version)
    with registry.errors():
        return registry.artifact_text(info.mlflow_run_id, "README.md")

