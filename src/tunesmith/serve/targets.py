"""What a server serves: each fine-tuned version under a public name, resolved to a checked local run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.models import DEFAULT_MODEL_NAME
from tunesmith.registry.run import Run


@dataclass(frozen=True)
class ServedTarget:
    """One served name: a registry reference as the user wrote it (`orders@production`) or a run's name."""

    name: str
    run: Run
    version: str | None = None
    """The registered version number behind a registry reference (so `orders@production` says which it is)."""
    model: str | None = None
    """The registered model behind a registry reference."""

    @property
    def engine_name(self) -> str:
        """The version itself (`orders@3`): served names that resolve to one version share its weights."""
        return f"{self.model}@{self.version}" if self.model else self.name

    @property
    def follows_alias(self) -> bool:
        """A registry alias (`orders@production`), which a promotion or rollback moves to another version."""
        return self.model is not None and self.name != self.engine_name

    @property
    def run_dir(self) -> Path:
        return self.run.directory

    @property
    def base_key(self) -> str:
        """Versions with the same base key share one copy of the base model."""
        return str(self.run.base_source)

    @property
    def base_name(self) -> str:
        return served_base_name(self.run.manifest.base_model.name)

    @property
    def is_adapter(self) -> bool:
        return self.run.is_trained and not self.run.is_full_fine_tune


def served_base_name(base_model: str) -> str:
    """The public name of a base model: the default's real name, else the folder or Hub repo name."""
    if base_model == "default":
        return DEFAULT_MODEL_NAME
    return Path(base_model.rstrip("/")).name or base_model


def resolve_targets(references: list[str]) -> list[ServedTarget]:
    """Run directories and registry references (NAME@VERSION, NAME@ALIAS, models:/NAME@ALIAS) as served targets,
    each local copy verified; two references with one public name are refused."""
    targets, seen = [], {}
    for reference in references:
        target = resolve_target(reference)
        if target.name in seen:
            raise TunesmithError(f"{reference}: serves under the name {target.name!r}, which {seen[target.name]!r} "
                                 "already uses; serve one of them, or register it under another name")
        seen[target.name] = reference
        targets.append(target)
    if not targets:
        raise TunesmithError("nothing to serve: name at least one run directory or registered version")
    return targets


def resolve_target(reference: str) -> ServedTarget:
    """A run directory or registry reference as a served target, its local copy verified."""
    if Path(reference).exists() or "@" not in reference:
        if not Path(reference).is_dir():
            raise TunesmithError(f"{reference}: no such run directory or registered version (NAME@VERSION, NAME@ALIAS)")
        run = Run.open(reference)
        return ServedTarget(run.name, run)
    from tunesmith.registry.store import Registry

    registry = Registry()
    name, version = registry.resolve(reference)
    public = reference.removeprefix("models:/")
    return ServedTarget(public, Run.open(registry.local_copy(name, version)), version, name)
