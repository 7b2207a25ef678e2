"""`tunesmith data ...`: inspect a file, prepare a run's data, run the pre-flight check. Heavy imports stay inside.

File names, keys, roles and messages come from the user's data: they are printed as plain text (never parsed as
rich markup) with any lone surrogate escaped, and a user error is one line on stderr with exit code 2.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith.cli.output import plain

data_app = typer.Typer(help="Data stage: inspect files, prepare (validate, clean, dedup, split, card), pre-flight check, mine preference pairs.",
                       no_args_is_help=True)


@contextmanager
def user_errors():
    """Print a TunesmithError as one plain `error:` line on stderr and exit 2 (the user's text is not markup)."""
    from tunesmith.errors import TunesmithError

    try:
        yield
    except TunesmithError as exc:
        from tunesmith.cli.output import print_error

        print_error(exc)
        raise typer.Exit(2) from None


@data_app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="Data file (.jsonl, .json, .csv, .parquet) or saved dataset folder.")],
    format: Annotated[str, typer.Option("--format", help="Expected format (default: detect).")] = "auto",
    model: Annotated[Optional[str], typer.Option(help="Also flag this model's special tokens inside content ('default' or a path).")] = None,
) -> None:
    """Show a data file's formats, row counts, problems by reason, duplicates and PII, writing nothing."""
    with user_errors():
        _inspect(path, format, model)


def _inspect(path: Path, format: str, model: str | None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from tunesmith.data.inspect import inspect_file

    special_tokens = ()
    if model:
        from tunesmith.data.prepare import special_token_texts
        from tunesmith.models import load_tokenizer, resolve_base_model

        special_tokens = special_token_texts(load_tokenizer(resolve_base_model(model)))
    report = inspect_file(path, format, special_tokens)
    console = Console(highlight=False)
    console.print(Text.assemble(plain(report["path"], "bold"), f" ({report['file_type']}): {report['rows']:,} rows, "
                                f"{report['valid']:,} valid; formats {report['formats'] or 'none'}; "
                                f"{report['exact_duplicates']:,} exact duplicates"))
    if report["problems"]:
        table = Table("problem", "rows", "first lines", title="rows that would be dropped (lenient) or stop prepare (strict)")
        for reason, count in sorted(report["problems"].items(), key=lambda item: -item[1]):
            table.add_row(plain(reason), f"{count:,}", plain("\n".join(report["first_problems"][reason])))
        console.print(table)
    if report["pii_found"]:
        console.print(plain("PII found (redacted only with data.redact_pii=true): "
                            + ", ".join(f"{n} {kind}" for kind, n in report["pii_found"].items())))


@data_app.command()
def prepare(
    config: Annotated[Path, typer.Argument(help="YAML config (see `tunesmith options`).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Config overrides such as data.mode=lenient.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
) -> None:
    """Validate, clean, dedup and split the data; write the run directory with its data card and pre-flight report."""
    with user_errors():
        _prepare(config, overrides or [], overwrite)


def _prepare(config: Path, overrides: list[str], overwrite: bool) -> None:
    from rich.console import Console
    from rich.text import Text

    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare as prepare_data
    from tunesmith.registry.run import Run

    run_dir = prepare_data(load_config(config, overrides), overwrite=overwrite)
    data = Run.open(run_dir).manifest.data
    accounting, console = data.accounting, Console(highlight=False)
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in sorted(accounting["dropped"].items(), key=lambda i: -i[1]))
    console.print(Text.assemble(("prepared ", "bold green"), plain(run_dir),
                                f": read {accounting['read']:,} = kept {accounting['kept']:,} + dropped "
                                f"{sum(accounting['dropped'].values()):,}{f' ({dropped})' if dropped else ''}"))
    console.print(plain(f"  {data.rows['train']:,} train / {data.rows['validation']:,} validation rows; "
                        f"version {data.dataset_hash[:12]}; card {run_dir / data.card} (+ .html); "
                        f"dropped rows {run_dir / data.dropped_file}"))


@data_app.command()
def check(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `tunesmith prepare`.")],
    against: Annotated[Optional[list[Path]], typer.Option("--against", help="Benchmark file that must not overlap train.")] = None,
    examples: Annotated[Optional[int], typer.Option(help="Examples to mask-check (default: data.preflight_examples).")] = None,
) -> None:
    """Pre-flight check: loss mask, train/inference template agreement, no held-out or benchmark overlap."""
    with user_errors():
        _check(run_dir, against or [], examples)


def _check(run_dir: Path, against: list[Path], examples: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from tunesmith.config import load_run_config
    from tunesmith.data.preflight import preflight_report, raise_on_failures
    from tunesmith.models import load_tokenizer
    from tunesmith.registry.run import Run

    overrides = [f"data.preflight_examples={examples}"] if examples is not None else []
    config, run = load_run_config(run_dir, overrides), Run.open(run_dir)
    tokenizer = load_tokenizer(run.base_source)
    report = preflight_report(run_dir, config, tokenizer, run.manifest.data.model_dump(), tuple(against))
    table = Table("check", "ok", "detail", title=plain(f"pre-flight check of {run_dir}"))
    for item in report["checks"]:
        table.add_row(plain(item["name"]), plain("yes", "green") if item["ok"] else plain("NO", "red"), plain(item["detail"]))
    Console(highlight=False).print(table)
    raise_on_failures(report)


from tunesmith.cli.loop_commands import from_logs_command  # noqa: E402 (only typer at import time)

data_app.command("from-logs")(from_logs_command)


@data_app.command("mine-pairs")
def mine_pairs(
    run_dir: Annotated[Path, typer.Argument(help="A trained SFT run directory (its training prompts are asked again).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Preference JSONL file to write (prompt/chosen/rejected).")],
    samples: Annotated[int, typer.Option(help="Answers sampled per training prompt.")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (1.0: what a client with default settings gets).")] = 1.0,
    max_prompts: Annotated[Optional[int], typer.Option(help="Ask at most this many training prompts (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (the same seed gives the same pairs).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts answered together.")] = 16,
    whole: Annotated[bool, typer.Option("--whole", help="Keep whole wrong answers as rejected (default: cut just after the first wrong word).")] = False,
) -> None:
    """Preference pairs from the model's own mistakes: sample its answers to its training prompts, keep the reference
    as chosen and its most frequent wrong answer, cut after its first wrong word, as rejected. Train DPO on them
    with train.init_from=RUN_DIR."""
    with user_errors():
        _mine_pairs(run_dir, out, samples, temperature, max_prompts, seed, batch_size, whole)


def _mine_pairs(run_dir: Path, out: Path, samples: int, temperature: float, max_prompts: int | None, seed: int,
                batch_size: int, whole: bool) -> None:
    from rich.console import Console

    from tunesmith.evaluate.mined_pairs import mine_pairs as mine
    from tunesmith.progress_display import LoggedProgress

    with LoggedProgress(transient=True) as progress:
        task = progress.add_task("sampling answers", total=None)
        mined = mine(run_dir, out, samples, temperature, max_prompts, seed, batch_size,
                     on_progress=lambda n: progress.advance(task, n), cut=not whole,
                     on_start=lambda total: progress.update(task, total=total))
    console = Console(highlight=False)
    console.print(plain(f"wrote {mined.pairs:,} pairs to {out}: {mined.prompts:,} training prompts x {mined.samples} "
                        f"samples at temperature {temperature}, {mined.error_rate:.1%} of answers wrong"
                        + (f"; {mined.skipped_with_tools:,} prompts with tools skipped" if mined.skipped_with_tools else "")))
    for example in mined.examples:
        console.print(plain(f"  {example['prompt'][:70]!r}\n    chosen   {example['reference'][:90]}\n"
                            f"    rejected {example['mistake'][:90]}"))
    console.print(plain(f"next: point a DPO config's data.train at {out} and run it with train.init_from={run_dir}"))
