"""The `tunesmith` command: the only place that chains stages. Heavy imports stay inside commands so --help is instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="tunesmith: labeled data -> a fine-tuned LLM that beats its base model, evaluated and served.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)

from tunesmith.cli.data_commands import data_app  # noqa: E402 (only typer; data libraries load inside commands)

app.add_typer(data_app, name="data")

ConfigArg = Annotated[Path, typer.Argument(help="YAML config (see `tunesmith options` for every key).")]
RunDirArg = Annotated[Path, typer.Argument(help="Run directory written by `tunesmith prepare` or `run`.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Config overrides such as train.lora.r=32.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory of the same name.")]


@app.command()
def run(config: ConfigArg, overrides: Overrides = None, overwrite: Overwrite = False) -> None:
    """Prepare data, train, and evaluate against the base model, all from one YAML file."""
    from tunesmith.cli import output
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.evaluate.run import evaluate_run

    settings = load_config(config, overrides or [])
    run_dir = prepare(settings, overwrite=overwrite)
    output.prepared(run_dir)
    output.trained(run_dir, _train_stage(run_dir, settings))
    output.evaluated(run_dir, evaluate_run(run_dir, settings))
    output.artifacts(run_dir)


@app.command()
def prepare(
    config: ConfigArg, overrides: Overrides = None, overwrite: Overwrite = False,
    show_mask: Annotated[int, typer.Option(help="Print N training examples with the trained tokens highlighted.")] = 0,
) -> None:
    """Validate, split and tokenize-check the data; write a new run directory."""
    from tunesmith.cli import output
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare as prepare_data

    settings = load_config(config, overrides or [])
    run_dir = prepare_data(settings, overwrite=overwrite)
    output.prepared(run_dir)
    if show_mask:
        output.show_mask(run_dir, settings, show_mask)


@app.command()
def train(run_dir: RunDirArg, overrides: Overrides = None) -> None:
    """Train a LoRA adapter on a prepared run directory."""
    from tunesmith.cli import output
    from tunesmith.config import load_run_config

    output.trained(run_dir, _train_stage(run_dir, load_run_config(run_dir, overrides or [])))


def _train_stage(run_dir: Path, settings) -> dict:
    """The training entry point for `train.method`: SFT, or preference tuning (DPO, KTO)."""
    if settings.train.method == "sft":
        from tunesmith.train.sft import train_sft

        return train_sft(run_dir, settings)
    from tunesmith.train.preference import train_preference

    return train_preference(run_dir, settings)


@app.command()
def evaluate(run_dir: RunDirArg, overrides: Overrides = None) -> None:
    """Compare the base model and the trained adapter on the held-out split."""
    from tunesmith.cli import output
    from tunesmith.config import load_run_config
    from tunesmith.evaluate.run import evaluate_run

    output.evaluated(run_dir, evaluate_run(run_dir, load_run_config(run_dir, overrides or [])))


@app.command()
def serve(
    run_dir: RunDirArg,
    host: Annotated[Optional[str], typer.Option(help="Listen address (default: serve.host).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default: serve.port).")] = None,
) -> None:
    """Serve the base model and the adapter behind an OpenAI-compatible API."""
    from tunesmith.config import load_run_config
    from tunesmith.serve.app import run_server

    settings = load_run_config(run_dir).serve
    run_server(run_dir, host or settings.host, port or settings.port, settings.max_new_tokens)


@app.command()
def chat(
    run_dir: RunDirArg,
    model: Annotated[Optional[str], typer.Option(help="Served model name (default: the fine-tuned adapter).")] = None,
) -> None:
    """Talk to the fine-tuned model (or the base) in the terminal, with the training chat template."""
    from tunesmith.cli.chat import chat_loop

    chat_loop(run_dir, model)


@app.command()
def plan(
    config: ConfigArg, overrides: Overrides = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, or a device size such as cuda:80GB or cpu:16GB.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plans as JSON.")] = False,
) -> None:
    """Estimate training memory (weights, gradients, optimizer, activations, LoRA) for full/LoRA/QLoRA and whether it fits."""
    from tunesmith.cli.plan_view import plans_json, print_plans
    from tunesmith.config import load_config
    from tunesmith.train.planner import parse_device, plan_memory

    settings = load_config(config, overrides or [])
    target = parse_device(device)
    plans = plan_memory(settings, target)
    if as_json:
        typer.echo(plans_json(plans, target))
    else:
        print_plans(plans, target, settings)


@app.command("fetch-model")
def fetch_model() -> None:
    """Download and convert the embedded default model (SmolLM2-135M-Instruct) into the tunesmith home."""
    from tunesmith.models import resolve_base_model

    typer.echo(f"default model: {resolve_base_model('default')}")


@app.command()
def options(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print docs/config.md instead of a table.")] = False,
) -> None:
    """List every config option with its type, default and meaning."""
    from rich.console import Console
    from rich.table import Table

    from tunesmith.config import option_rows, options_markdown

    if markdown:
        typer.echo(options_markdown(), nl=False)
        return
    table = Table("option", "type", "default", "meaning", title="tunesmith config options")
    for row in option_rows():
        table.add_row(*row)
    Console().print(table)


def main() -> None:
    """Console entry point: user errors become one red line and exit code 2, never a traceback."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from tunesmith.errors import TunesmithError

    try:
        app()
    except TunesmithError as exc:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing half-written was kept", file=sys.stderr)
        sys.exit(130)
