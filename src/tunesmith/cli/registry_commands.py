"""`tunesmith register | registry ... | promote | rollback`: versions, lineage, aliases. Heavy imports stay inside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

registry_app = typer.Typer(help="Model registry (MLflow): list models, show a version's lineage and card, alias history.",
                           no_args_is_help=True)
Reference = Annotated[str, typer.Argument(help="NAME@VERSION, NAME@ALIAS or NAME (latest), e.g. orders@production.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def register(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Model name (default: the run's name).")] = None,
) -> None:
    """Make an immutable version of a trained run (the same weights, config and data give the same version)."""
    from rich.markup import escape

    from tunesmith.cli.output import console
    from tunesmith.registry.register import register_run
    from tunesmith.registry.store import Registry

    info, created = register_run(Registry(), run_dir, name)
    verb = "registered" if created else "already registered as"
    console.print(f"[bold green]{verb}[/] {info.model}@{info.version} (content {info.lineage.content_id[:12]}) "
                  f"from {escape(str(run_dir))}", highlight=False)


@registry_app.command("list")
def list_models(as_json: AsJson = False) -> None:
    """Every registered model, its versions and its aliases."""
    from tunesmith.registry.store import Registry

    registry = Registry()
    rows = registry.models()
    if as_json:
        import json

        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Column, Table

    from tunesmith.cli.output import console, plain

    if not rows:
        console.print(plain(f"nothing is registered yet in {registry.uri}; register a trained run with "
                            "`tunesmith register RUN` (add --name NAME to choose the model's name)"))
        return

    table = Table(Column("model", no_wrap=True), Column("version", no_wrap=True), Column("aliases", overflow="fold"),
                  Column("run", overflow="fold"), Column("content id", no_wrap=True), title="registered models")
    for model in rows:
        for version in model["versions"]:
            aliases = ", ".join(a for a, v in sorted(model["aliases"].items()) if str(v) == version["version"])
            table.add_row(model["name"], version["version"], aliases, version["run_name"] or "",
                          (version["content_id"] or "")[:12])
    console.print(table)


@registry_app.command()
def show(reference: Reference, as_json: AsJson = False) -> None:
    """A version's lineage: data, base model, config, code, parent, evaluation against the base, exports."""
    from tunesmith.registry.store import Registry

    registry = Registry()
    info = registry.version_info(*registry.resolve(reference))
    if as_json:
        typer.echo(info.model_dump_json(indent=2))
        return
    from tunesmith.cli.registry_view import print_version

    print_version(info)


@registry_app.command()
def card(reference: Reference) -> None:
    """Print the version's model card (Hugging Face format)."""
    from tunesmith.registry.register import card_text
    from tunesmith.registry.store import Registry

    registry = Registry()
    typer.echo(card_text(registry, *registry.resolve(reference)))


@registry_app.command()
def history(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[Optional[str], typer.Option(help="Only this alias.")] = None,
    as_json: AsJson = False,
) -> None:
    """Every alias move: when, which alias, from which version to which, why, and the evidence."""
    from tunesmith.registry.store import Registry, parse_reference

    moves = Registry().history(parse_reference(name)[0], alias)
    if as_json:
        import json

        typer.echo(json.dumps([m.model_dump(mode="json") for m in moves], indent=2))
        return
    from tunesmith.cli.registry_view import print_history

    print_history(name, moves)


def promote(
    reference: Reference,
    to: Annotated[str, typer.Option("--to", help="Alias to move, e.g. production.")],
    gate: Annotated[Optional[list[str]], typer.Option(
        "--gate", help='Extra gate, e.g. "exact_match >= champion + 0.02". Repeatable.')] = None,
    why: Annotated[str, typer.Option(help="Reason recorded with the move.")] = "gates passed",
) -> None:
    """Evaluate the version against the alias's current holder on the same held-out set; move the alias only
    when every gate passes (evaluate.gates, registry.promote_if, --gate), else exit 1 with the shortfall."""
    from tunesmith.cli.promotion import promote_version

    if not promote_version(reference, to, gate or [], why):
        raise typer.Exit(1)


def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Option(help="Alias to move back.")] = "production",
    why: Annotated[str, typer.Option(help="Reason recorded with the move.")] = "rollback",
) -> None:
    """Move the alias back to the version that held it before the current one."""
    from tunesmith.cli.output import console
    from tunesmith.registry.store import Registry, check_alias, parse_reference

    registry, model = Registry(), parse_reference(name)[0]
    current, previous = registry.rollback_target(model, check_alias(alias))
    registry.move_alias(model, alias, previous, "rollback", why, {"rolled_back": current})
    console.print(f"[bold green]rolled back[/] {model}@{alias}: {current} -> {previous}", highlight=False)
