"""The model registry on MLflow: immutable, content-addressed versions with lineage, aliases with a recorded
history, exports. A local SQLite store in the tunesmith home by default; `MLFLOW_TRACKING_URI` names a server.

Layout in MLflow: each version is an MLflow model version whose source is an MLflow run holding the run snapshot
(`run/`), `tunesmith/lineage.json`, `tunesmith/files.json`, the model card (`README.md`) and `exports/`. Every
alias move is an MLflow run in the `tunesmith-alias-history` experiment.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.models import tunesmith_home
from tunesmith.records import AliasMove, ExportRecord, Lineage, VersionInfo
from tunesmith.registry.hashing import folder_manifest, sha256_of_mapping
from tunesmith.registry.run_dir import apply_umask

EXPERIMENT = "tunesmith"
HISTORY_EXPERIMENT = "tunesmith-alias-history"
SNAPSHOT = "run"
LINEAGE = "tunesmith/lineage.json"
FILES = "tunesmith/files.json"
EXPORTS = "exports"
CONTENT_TAG, FILES_TAG = "tunesmith.content_id", "tunesmith.files_sha256"
COMPLETE_TAG = "tunesmith.complete"  # set last: a version without it was interrupted while registering
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,99}$")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else the local store under the tunesmith home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{registry_home() / 'mlflow.db'}"


def registry_home() -> Path:
    return tunesmith_home() / "registry"


def parse_reference(text: str) -> tuple[str, str | None]:
    """`orders@3`, `orders/3`, `orders@production`, `models:/orders@production` or `orders` -> (name, version|alias)."""
    text = text.strip().removeprefix("models:/")
    name, sep, which = text.partition("@") if "@" in text else text.partition("/")
    if not _NAME.match(name) or (sep and not which):
        raise TunesmithError(f"{text!r} is not a model reference; write NAME@VERSION, NAME@ALIAS or NAME "
                             "(such as orders@3 or orders@production)")
    return name, which or None


def check_alias(alias: str) -> str:
    if alias.isdigit() or not _ALIAS.match(alias):
        raise TunesmithError(f"alias {alias!r}: use letters, digits, _ and -, starting with a letter (such as production)")
    return alias


class Registry:
    """Registered models and their versions; every MLflow failure becomes one clear message."""

    def __init__(self, uri: str | None = None):
        self.uri = uri or tracking_uri()
        self.local = not self.uri.startswith(("http://", "https://", "databricks"))  # artifacts kept in the home
        if self.local and self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        else:
            _fail_fast_over_http()
            self._check_reachable()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        for noisy in ("mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

        with self.errors():
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @contextmanager
    def errors(self):
        """MLflow's exceptions (and a server that went away) as one TunesmithError naming the store."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            raise TunesmithError(f"MLflow ({self.uri}): {_first_line(exc.message)}") from None
        except OSError as exc:
            raise TunesmithError(f"MLflow at {self.uri} is unreachable ({_first_line(str(exc))}); start it, or unset "
                                 "MLFLOW_TRACKING_URI to use the local store") from None

    def experiment_id(self, name: str = EXPERIMENT) -> str:
        with self.errors():
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            location = (registry_home() / "artifacts" / name).as_uri() if self.local else None
            return self.client.create_experiment(name, artifact_location=location)

    # --- versions -------------------------------------------------------------------------------------------

    def find_by_content(self, content_id: str, name: str | None = None) -> list:
        """Model versions (of `name`, or of any model) whose content id matches."""
        query = (f"tags.`{CONTENT_TAG}` = '{content_id}' and tags.`{COMPLETE_TAG}` = 'true'"
                 + (f" and name = '{name}'" if name else ""))
        with self.errors():
            return list(self.client.search_model_versions(query))

    def create_version(self, name: str, run_id: str, tags: dict) -> str:
        from mlflow.exceptions import MlflowException

        with self.errors():
            try:
                self.client.create_registered_model(name, description="Fine-tuned with tunesmith")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{self.client.get_run(run_id).info.artifact_uri}/{SNAPSHOT}"
            return str(self.client.create_model_version(name, source, run_id=run_id, tags=tags).version)

    def registered_model(self, name: str):
        """MLflow's registered model `name`; an unknown name is one clear error that lists the registered ones."""
        from mlflow.exceptions import MlflowException

        with self.errors():
            try:
                return self.client.get_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                known = ", ".join(sorted(m.name for m in self.client.search_registered_models())) or "none yet"
        raise TunesmithError(f"no registered model {name!r} (registered: {known}); "
                             "register one with `tunesmith register RUN_DIR --name NAME`")

    def resolve(self, reference: str) -> tuple[str, str]:
        """(model, version number) for a reference; unknown names, versions and aliases are one clear error."""
        name, which = parse_reference(reference)
        model = self.registered_model(name)
        with self.errors():
            complete = {str(v.version) for v in self.client.search_model_versions(
                f"name = '{name}' and tags.`{COMPLETE_TAG}` = 'true'")}
            if which is None:
                if not complete:
                    raise TunesmithError(f"{name} has no versions yet")
                return name, str(max(complete, key=int))
            if which.isdigit():
                if which not in complete:
                    raise TunesmithError(f"{name} has no version {which}; see `tunesmith registry list`")
                return name, which
            aliases = getattr(model, "aliases", {}) or {}
            if which not in aliases:
                known = ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items())) or "none"
                raise TunesmithError(f"{name} has no alias {which!r} (aliases: {known}); "
                                     f"set one with `tunesmith promote {name}@VERSION --to {which}`")
            return name, str(aliases[which])

    def version_info(self, name: str, version: str) -> VersionInfo:
        with self.errors():
            mv = self.client.get_model_version(name, version)
            lineage = Lineage.model_validate(json.loads(self.artifact_text(mv.run_id, LINEAGE)))
            exports = [ExportRecord.model_validate(json.loads(self.artifact_text(mv.run_id, item.path)))
                       for item in self.client.list_artifacts(mv.run_id, EXPORTS) if item.path.endswith(".json")]
            aliases = [a for a, v in (self.client.get_registered_model(name).aliases or {}).items() if str(v) == version]
        return VersionInfo(model=name, version=version, aliases=sorted(aliases), mlflow_run_id=mv.run_id,
                           source=mv.source, lineage=lineage, exports=exports)

    def models(self) -> list[dict]:
        """Every registered model with its versions and aliases."""
        with self.errors():
            rows = []
            for model in self.client.search_registered_models():
                versions = sorted(self.client.search_model_versions(
                    f"name = '{model.name}' and tags.`{COMPLETE_TAG}` = 'true'"), key=lambda v: int(v.version))
                rows.append({"name": model.name, "aliases": dict(model.aliases or {}),
                             "versions": [{"version": str(v.version), "run_name": v.tags.get("tunesmith.run_name"),
                                           "content_id": v.tags.get(CONTENT_TAG), "created": v.creation_timestamp}
                                          for v in versions]})
            return rows

    def local_copy(self, name: str, version: str) -> Path:
        """The version's run snapshot as a local run directory, every file checked against its registered hash."""
        with self.errors():
            mv = self.client.get_model_version(name, version)
        content, files_hash = mv.tags.get(CONTENT_TAG), mv.tags.get(FILES_TAG)
        if not content or not files_hash:
            raise TunesmithError(f"{name}@{version} was not registered by tunesmith (no content tags)")
        target = registry_home() / "cache" / files_hash  # exactly these files, whichever store they came from
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{files_hash[:16]}.tmp-"))
            try:
                apply_umask(staging, directory=True)
                with self.errors():
                    self.client.download_artifacts(mv.run_id, SNAPSHOT, str(staging))
                os.replace(staging / SNAPSHOT, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        files = folder_manifest(target)
        if sha256_of_mapping(files) != files_hash:
            expected = json.loads(self.artifact_text(mv.run_id, FILES))
            changed = sorted(set(files.items()) ^ set(expected.items()))
            raise TunesmithError(f"{name}@{version}: the stored files do not match their registered hashes "
                                 f"({changed[0][0] if changed else 'file list'} differs); delete {target} to fetch "
                                 "them again, or re-register the run")
        return target

    def log_artifact(self, name: str, version: str, local_path: Path, artifact_path: str) -> None:
        with self.errors():
            run_id = self.client.get_model_version(name, version).run_id
            self.client.log_artifact(run_id, str(local_path), artifact_path)

    def artifact_json(self, name: str, version: str, path: str) -> dict | None:
        """A JSON artifact of the version's run, or None when it was never written."""
        with self.errors():
            run_id = self.client.get_model_version(name, version).run_id
            folder, _, file_name = path.rpartition("/")
            if not any(item.path == path for item in self.client.list_artifacts(run_id, folder or None)):
                return None
            return json.loads(self.artifact_text(run_id, path))

    def artifact_text(self, run_id: str, path: str) -> str:
        with tempfile.TemporaryDirectory() as scratch:
            local = self.client.download_artifacts(run_id, path, scratch)
            return Path(local).read_text(encoding="utf-8")

    # --- aliases --------------------------------------------------------------------------------------------

    def move_alias(self, name: str, alias: str, version: str, kind: str, why: str, evidence: dict) -> AliasMove:
        """Point `alias` at `version`, recording when, from, to, why and the evidence; the move is all or nothing."""
        check_alias(alias)
        with self.errors():
            previous = (self.client.get_registered_model(name).aliases or {}).get(alias)
            move = AliasMove(model=name, alias=alias, kind=kind, from_version=previous and str(previous),
                             to_version=version, why=why, evidence=evidence,
                             when=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            record = self.client.create_run(self.experiment_id(HISTORY_EXPERIMENT),
                                            run_name=f"{name}@{alias}: {previous or '-'} -> {version}",
                                            tags={"tunesmith.model": name, "tunesmith.alias": alias,
                                                  "tunesmith.kind": kind})
            try:
                self.client.log_dict(record.info.run_id, move.model_dump(mode="json"), "move.json")
                self.client.set_registered_model_alias(name, alias, version)
            except BaseException:
                self.client.delete_run(record.info.run_id)
                raise
            self.client.set_terminated(record.info.run_id)
        return move

    def history(self, name: str, alias: str | None = None) -> list[AliasMove]:
        """Every completed alias move of `name` (of one alias when given), oldest first; an unknown name is an error."""
        self.registered_model(name)
        with self.errors():
            experiment = self.client.get_experiment_by_name(HISTORY_EXPERIMENT)
            if experiment is None:
                return []
            query = f"tags.`tunesmith.model` = '{name}' and attributes.status = 'FINISHED'"
            if alias:
                query += f" and tags.`tunesmith.alias` = '{alias}'"
            runs = self.client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time ASC"])
            return [AliasMove.model_validate(json.loads(self.artifact_text(r.info.run_id, "move.json"))) for r in runs]

    def rollback_target(self, name: str, alias: str) -> tuple[str, str]:
        """(current holder, previous holder) of `alias`, replaying its history: a move pushes a holder, a rollback
        pops one, so repeated rollbacks walk further back."""
        holders: list[str] = []
        for move in self.history(name, alias):
            if move.kind == "rollback" and holders:
                holders.pop()
            else:
                holders.append(move.to_version)
        current = (self.registered_model(name).aliases or {}).get(alias)
        if current is None:
            raise TunesmithError(f"{name} has no alias {alias!r} to roll back")
        if not holders or holders[-1] != str(current):
            raise TunesmithError(f"{name}@{alias} was moved outside tunesmith (it points at {current}, its recorded "
                                 f"history ends at {holders[-1] if holders else 'nothing'}); move it with "
                                 f"`tunesmith promote {name}@VERSION --to {alias}`")
        if len(holders) < 2:
            raise TunesmithError(f"{name}@{alias} has no earlier holder to roll back to (it has only held {current})")
        return holders[-1], holders[-2]

    def _check_reachable(self) -> None:
        import httpx

        try:
            httpx.get(self.uri.rstrip("/") + "/health", timeout=5)
        except httpx.HTTPError as exc:
            raise TunesmithError(f"MLflow at {self.uri} is unreachable ({_first_line(str(exc)) or type(exc).__name__}); "
                                 "start the server, or unset MLFLOW_TRACKING_URI to use the local store") from None


def _fail_fast_over_http() -> None:
    """MLflow's client retries a dead server for minutes by default; one clear error is better."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0][:300]
