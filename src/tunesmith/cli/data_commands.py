"""`tunesmith data ...`: inspect a file, prepare a run's data, run the pre-flight check. Heavy imports stay inside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

data_app = typer.Typer(help="Data stage: inspect files, prepare (validate, clean, dedup, split, card), pre-flight check.",
                       no_args_is_help=True)


@data_app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="Data file (.jsonl, .json, .csv, .parquet) or saved dataset folder.")],
    format: Annotated[str, typer.Option("--format", help="Expected format (default: detect).")] = "auto",
    model: Annotated[Optional[str], typer.Option(help="Also flag this model's special tokens inside content ('default' or a path).")] = None,
) -> None:
    """Show a data file's formats, row counts, problems by reason, duplicates and PII, writing nothing."""
    from rich.console import Console
    from rich.table import Table

    from tunesmith.data.inspect import inspect_file

    special_tokens = ()
    if model:
        from tunesmith.data.prepare import special_token_texts
        from tunesmith.models import load_tokenizer, resolve_base_model

        special_tokens = special_token_texts(load_tokenizer(resolve_base_model(model)))
    report = inspect_file(path, format, special_tokens)
    console = Console()
    console.print(f"[bold]{report['path']}[/] ({report['file_type']}): {report['rows']:,} rows, {report['valid']:,} valid; "
                  f"formats {report['formats'] or 'none'}; {report['exact_duplicates']:,} exact duplicates")
    if report["problems"]:
        table = Table("problem", "rows", "first lines", title="rows that would be dropped (lenient) or stop prepare (strict)")
        for reason, count in sorted(report["problems"].items(), key=lambda item: -item[1]):
            table.add_row(reason, f"{count:,}", "\n".join(report["first_problems"][reason]))
        console.print(table)
    if report["pii_found"]:
        console.print("PII found (redacted only with data.redact_pii=true): "
                      + ", ".join(f"{n} {kind}" for kind, n in report["pii_found"].items()))


@data_app.command()
def prepare(
    config: Annotated[Path, typer.Argument(help="YAML config (see `tunesmith options`).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Config overrides such as data.mode=lenient.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
) -> None:
    """Validate, clean, dedup and split the data; write the run directory with its data card and pre-flight report."""
    from rich.console import Console

    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare as prepare_data
    from tunesmith.registry.run import Run

    run_dir = prepare_data(load_config(config, overrides or []), overwrite=overwrite)
    data = Run.open(run_dir).manifest.data
    accounting, console = data.accounting, Console()
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in sorted(accounting["dropped"].items(), key=lambda i: -i[1]))
    console.print(f"[bold green]prepared[/] {run_dir}: read {accounting['read']:,} = kept {accounting['kept']:,} + dropped "
                  f"{sum(accounting['dropped'].values()):,}{f' ({dropped})' if dropped else ''}")
    console.print(f"  {data.rows['train']:,} train / {data.rows['validation']:,} validation rows; "
                  f"version {data.dataset_hash[:12]}; card {run_dir / data.card} (+ .html); "
                  f"dropped rows {run_dir / data.dropped_file}")


@data_app.command()
def check(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `tunesmith prepare`.")],
    against: Annotated[Optional[list[Path]], typer.Option("--against", help="Benchmark file that must not overlap train.")] = None,
    examples: Annotated[Optional[int], typer.Option(help="Examples to mask-check (default: data.preflight_examples).")] = None,
) -> None:
    """Pre-flight check: loss mask, train/inference template agreement, no held-out or benchmark overlap."""
    from rich.console import Console
    from rich.table import Table

    from tunesmith.config import load_run_config
    from tunesmith.data.preflight import preflight_report, raise_on_failures
    from tunesmith.models import load_tokenizer
    from tunesmith.registry.run import Run

    overrides = [f"data.preflight_examples={examples}"] if examples is not None else []
    config, run = load_run_config(run_dir, overrides), Run.open(run_dir)
    tokenizer = load_tokenizer(run.base_source)
    report = preflight_report(run_dir, config, tokenizer, run.manifest.data.model_dump(), tuple(against or ()))
    table = Table("check", "ok", "detail", title=f"pre-flight check of {run_dir}")
    for item in report["checks"]:
        table.add_row(item["name"], "[green]yes[/]" if item["ok"] else "[red]NO[/]", item["detail"])
    Console().print(table)
    raise_on_failures(report)
