"""`tunesmith keys create | list | revoke | usage`: API keys for `tunesmith serve`. Heavy imports stay inside."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

keys_app = typer.Typer(help="API keys for `tunesmith serve`: create, list and revoke keys; usage per key and model.",
                       no_args_is_help=True)


@keys_app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="A name for the key, unique among active keys, e.g. team-a.")],
    models: Annotated[Optional[list[str]], typer.Option(
        "--models", help="A model the key may call, or a pattern such as 'orders@*'. Repeatable; none = every model.")
    ] = None,
    rpm: Annotated[Optional[int], typer.Option("--rpm", help="Requests per minute (default: no limit).")] = None,
    tpm: Annotated[Optional[int], typer.Option(
        "--tpm", help="Prompt + completion tokens per minute (default: no limit).")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May call the server's admin endpoints.")] = False,
) -> None:
    """Create a key and print it once: only a salted hash of it is stored. The key is the only line on stdout
    (`KEY=$(tunesmith keys create --name team-a)`); what it is and how to use it goes to stderr."""
    from rich.console import Console
    from rich.markup import escape

    from tunesmith.serve.gateway.keys import KeyStore

    store = KeyStore()
    key, full_key = store.create(name, models or (), rpm, tpm, admin)
    notes = Console(stderr=True, highlight=False)
    notes.print(f"[bold green]created[/] key {key.name} ({key.key_id}): {escape(_limits(key))}")
    typer.echo(full_key)  # plain, unwrapped: it is meant to be copied or piped
    notes.print("[bold yellow]This key cannot be shown again[/]: store it now (clients send it as "
                "`Authorization: Bearer <key>`, the openai client as api_key).")
    notes.print(f"`tunesmith serve` needs nothing more: it reads the key store ({store.path}) and accepts the key "
                "within a second, also while running.", markup=False)


@keys_app.command("list")
def list_keys(
    include_revoked: Annotated[bool, typer.Option("--all", help="Show revoked keys too.")] = False,
) -> None:
    """Keys with their models and limits (never their secrets)."""
    from rich.markup import escape
    from rich.table import Column, Table

    from tunesmith.cli.output import console
    from tunesmith.serve.gateway.keys import KeyStore

    keys = KeyStore().list(include_revoked)
    if not keys:
        console.print("no API keys; create one with `tunesmith keys create --name NAME`", markup=False)
        return
    # Names and ids never wrap (they are what `revoke` takes); on a narrow terminal the rest folds, never hides.
    times = [Column(label, overflow="fold") for label in ("created (UTC)", "revoked")[:1 + include_revoked]]
    table = Table(Column("name", no_wrap=True), Column("id", no_wrap=True), Column("models", overflow="fold"),
                  Column("rpm", justify="right"), Column("tpm", justify="right"), "admin", *times, title="API keys")
    for key in keys:
        table.add_row(key.name, key.key_id, escape(", ".join(key.models) or "every model"), _limit(key.rpm),
                      _limit(key.tpm), "yes" if key.admin else "", _minute(key.created),
                      *([_minute(key.revoked)] if include_revoked else []))
    console.print(table)


@keys_app.command()
def revoke(name_or_id: Annotated[str, typer.Argument(help="The key's name or id (see `tunesmith keys list`).")]) -> None:
    """Revoke a key; a running server refuses it within a second."""
    from tunesmith.cli.output import console
    from tunesmith.serve.gateway.keys import KeyStore

    key = KeyStore().revoke(name_or_id)
    console.print(f"[bold green]revoked[/] key {key.name} ({key.key_id}); a running server refuses it within a "
                  "second", highlight=False)


@keys_app.command()
def usage(
    since: Annotated[Optional[str], typer.Option("--since", help="First UTC day to include: 2026-11-01, or an age "
                                                                 "such as 7d, 24h or 30m (from the day it falls in).")
                     ] = None,
    key: Annotated[Optional[str], typer.Option("--key", help="Only this key (name or id).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Requests and tokens per key, model and UTC day, with totals."""
    from tunesmith.serve.gateway.keys import KeyStore

    rows = KeyStore().usage(_day(since), key)
    if as_json:
        import json
        from dataclasses import asdict

        typer.echo(json.dumps([asdict(row) for row in rows], indent=2))
        return
    from tunesmith.cli.output import console

    if not rows:
        console.print("no usage recorded" + (f" since {since}" if since else ""), markup=False)
        return
    console.print(_usage_table(rows))


def _usage_table(rows):
    from rich.markup import escape
    from rich.table import Column, Table

    counts = [Column(label, justify="right") for label in ("requests", "prompt tokens", "completion tokens")]
    table = Table(Column("day (UTC)", no_wrap=True), "key", "id", "model", *counts, title="usage", show_footer=True)
    for row in rows:
        table.add_row(row.day, row.key_name, row.key_id, escape(row.model), f"{row.requests:,}",
                      f"{row.prompt_tokens:,}", f"{row.completion_tokens:,}")
    totals = [sum(getattr(row, field) for row in rows) for field in ("requests", "prompt_tokens", "completion_tokens")]
    table.columns[0].footer = "total"
    for column, total in zip(table.columns[4:], totals):
        column.footer = f"{total:,}"
    return table


def _day(text: str | None):
    """The UTC day `--since` falls in, read as `tunesmith logs export --since` reads it (a date, a time or an age)."""
    from datetime import timezone

    from tunesmith.request_log import parse_since

    return None if text is None else parse_since(text).astimezone(timezone.utc).date()


def _minute(timestamp: str | None) -> str:
    """`2024-05-01T12:34:56+00:00` as `2024-05-01 12:34` (the store writes UTC)."""
    return (timestamp or "")[:16].replace("T", " ")


def _limit(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _limits(key) -> str:
    models = ", ".join(key.models) or "every model"
    rpm = f"{key.rpm:,} requests/min" if key.rpm else "no request limit"
    tpm = f"{key.tpm:,} tokens/min" if key.tpm else "no token limit"
    return f"{models}; {rpm}, {tpm}" + ("; admin" if key.admin else "")
