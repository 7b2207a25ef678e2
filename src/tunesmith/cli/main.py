"""The `tunesmith` command: the only place that chains stages. Heavy imports stay inside commands so --help is instant."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="tunesmith: labeled data -> a fine-tuned LLM that beats its base model, evaluated and served.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)

from tunesmith.cli.advise_command import advise_command  # noqa: E402 (only typer; data libraries load inside commands)
from tunesmith.cli.data_commands import data_app  # noqa: E402
from tunesmith.cli.keys_command import keys_app  # noqa: E402
from tunesmith.cli.logs_command import logs_app  # noqa: E402
from tunesmith.cli.loop_commands import retrain_command  # noqa: E402
from tunesmith.cli.monitor_command import monitor_command  # noqa: E402
from tunesmith.cli.registry_commands import promote, register, registry_app, rollback  # noqa: E402

app.add_typer(data_app, name="data")
app.add_typer(registry_app, name="registry")
app.add_typer(keys_app, name="keys", help="API keys for `tunesmith serve`: create, list, revoke, usage.")
app.add_typer(logs_app, name="logs", help="The request log of `tunesmith serve`: export as training data, tail.")
app.command("advise")(advise_command)
app.command("monitor")(monitor_command)
app.command("retrain")(retrain_command)
app.command()(register)
app.command()(promote)
app.command()(rollback)

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
    from tunesmith.evaluate.gates import check_config_gates
    from tunesmith.evaluate.run import evaluate_run

    settings = load_config(config, overrides or [])
    check_config_gates(settings)  # a misspelled gate fails now, not after training
    run_dir = prepare(settings, overwrite=overwrite)
    output.prepared(run_dir)
    output.trained(run_dir, _stoppable_train(run_dir, settings))
    report = evaluate_run(run_dir, settings)
    output.evaluated(run_dir, report)
    output.artifacts(run_dir)
    if not report["passed"]:  # a gate in the config failed
        raise typer.Exit(1)
    _track_and_register(run_dir, settings)


def _track_and_register(run_dir: Path, settings) -> None:
    """What the config's `registry` section asks for after a run: MLflow tracking, a version, a promotion."""
    registry = settings.registry
    if not registry.name:
        if registry.track:
            _track(run_dir)
        return
    from rich.markup import escape

    from tunesmith.cli.output import console
    from tunesmith.registry.register import register_run
    from tunesmith.registry.store import Registry

    store = Registry()
    info, created = register_run(store, run_dir, registry.name)
    console.print(f"[bold green]{'registered' if created else 'already registered as'}[/] {info.model}@{info.version}"
                  f" ({escape(store.uri)})", highlight=False)
    if registry.promote_to:
        from tunesmith.cli.promotion import promote_version

        if not promote_version(f"{info.model}@{info.version}", registry.promote_to, [], "registry.promote_to"):
            raise typer.Exit(1)


@app.command()
def prepare(
    config: ConfigArg, overrides: Overrides = None, overwrite: Overwrite = False,
    show_mask: Annotated[int, typer.Option(help="Print N training examples with the trained tokens highlighted.")] = 0,
) -> None:
    """Validate, split and tokenize-check the data; write a new run directory."""
    from tunesmith.cli import output
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare as prepare_data
    from tunesmith.evaluate.gates import check_config_gates

    settings = load_config(config, overrides or [])
    check_config_gates(settings)  # the config's gates are checked with it, not first at evaluation
    run_dir = prepare_data(settings, overwrite=overwrite)
    output.prepared(run_dir)
    if show_mask:
        output.show_mask(run_dir, settings, show_mask)


@app.command()
def train(
    run_dir: RunDirArg, overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest intact checkpoint.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Delete an earlier attempt's checkpoints and start over.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes to train with (DDP via torchrun; gloo on CPU).")] = 1,
) -> None:
    """Train on a prepared run directory (SFT: full, LoRA, DoRA, QLoRA; DPO/KTO; or GRPO); SIGTERM saves a checkpoint."""
    from tunesmith.cli import output
    from tunesmith.config import load_run_config
    from tunesmith.train.distributed import is_main_process, launch_processes, launched_world_size

    if nproc > 1 and launched_world_size() == 1:
        command = ["train", str(run_dir), *(overrides or []), *(["--resume"] if resume else []),
                   *(["--restart"] if restart else [])]
        raise typer.Exit(launch_processes(nproc, command))
    section = _stoppable_train(run_dir, load_run_config(run_dir, overrides or []), resume, restart)
    if is_main_process():
        output.trained(run_dir, section)
        if load_run_config(run_dir).registry.track:
            _track(run_dir)


def _stoppable_train(run_dir: Path, settings, resume: bool = False, restart: bool = False) -> dict:
    """Train; a SIGTERM or Ctrl-C that saved a checkpoint ends with how to continue and the signal's exit code."""
    from tunesmith.train.distributed import is_main_process
    from tunesmith.train.loop import TrainingStopped

    try:
        return _train_stage(run_dir, settings, resume, restart)
    except TrainingStopped as stop:
        if is_main_process():
            print(f"{stop}; checkpoint {stop.checkpoint}; continue with `tunesmith train {run_dir} --resume`",
                  file=sys.stderr)
        raise typer.Exit(143 if stop.signal_name == "SIGTERM" else 130) from None


def _train_stage(run_dir: Path, settings, resume: bool = False, restart: bool = False) -> dict:
    """The training entry point for `train.method`: SFT, preference tuning (DPO, KTO) or GRPO."""
    if settings.train.method == "sft":
        from tunesmith.train.sft import train_sft

        return train_sft(run_dir, settings, resume=resume, restart=restart)
    if settings.train.method == "grpo":
        from tunesmith.train.grpo import train_grpo

        return train_grpo(run_dir, settings, resume=resume, restart=restart)
    from tunesmith.train.preference import train_preference

    return train_preference(run_dir, settings, resume=resume, restart=restart)


@app.command()
def evaluate(
    run_dir: RunDirArg, overrides: Overrides = None,
    gate: Annotated[Optional[list[str]], typer.Option(
        "--gate", help='Rule a model must pass, e.g. "exact_match >= base + 0.20"; any failure exits 1. Repeatable.')] = None,
    candidate: Annotated[Optional[list[Path]], typer.Option(
        "--candidate", help="Another run directory on the same base whose adapter is compared too. Repeatable.")] = None,
) -> None:
    """Compare the base model, the trained adapter and any candidates on the held-out split; check gates."""
    from tunesmith.cli import output
    from tunesmith.config import load_run_config
    from tunesmith.evaluate.run import evaluate_run

    settings = load_run_config(run_dir, overrides or [])
    report = evaluate_run(run_dir, settings, candidate or [], gate or [])
    output.evaluated(run_dir, report)
    if settings.registry.track:
        _track(run_dir)
    if not report["passed"]:
        raise typer.Exit(1)


def _track(run_dir: Path) -> None:
    """Log the run's params, loss curves and metrics to MLflow (`registry.track`)."""
    from rich.markup import escape

    from tunesmith.cli.output import console
    from tunesmith.registry.run import Run
    from tunesmith.registry.store import Registry
    from tunesmith.registry.tracking import track_run

    store = Registry()
    run_id = track_run(store, Run.open(run_dir))
    console.print(f"[bold green]tracked[/] in MLflow run {run_id} ({escape(store.uri)})", highlight=False)


@app.command()
def export(
    reference: Annotated[str, typer.Argument(help="NAME@VERSION or NAME@ALIAS of a registered version.")],
    format: Annotated[str, typer.Option("--format", help="merged (HF safetensors), gguf, or ollama (GGUF + Modelfile).")],
    dtype: Annotated[Optional[str], typer.Option(help="merged: fp32 (default), bf16, fp16; GGUF: f16 (default), bf16, "
                                                      "f32, q8_0, q4_0.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: exports/NAME-vVERSION-FORMAT-DTYPE).")] = None,
    check_examples: Annotated[int, typer.Option(help="Held-out prompts the export must answer like its source.")] = 50,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length compared per prompt.")] = 64,
) -> None:
    """Export a registered version; it is checked to answer like base + adapter before it is kept and recorded."""
    from tunesmith.cli.export_command import export_version

    export_version(reference, format, dtype, out, check_examples, max_new_tokens)


@app.command()
def serve(
    references: Annotated[Optional[list[str]], typer.Argument(
        help="Run directories or registered versions (NAME@VERSION, NAME@ALIAS), served together; LoRA versions of "
             "one base share one copy of it.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML whose serve: section sets the options "
                                                                     "(serve.models lists what to serve).")] = None,
    base: Annotated[Optional[bool], typer.Option("--base/--no-base", help="Also serve each base model under its "
                                                                          "own name (default: serve.serve_base).")] = None,
    engine: Annotated[Optional[str], typer.Option(help="native (tunesmith's batching engine), vllm or llamacpp "
                                                       "(default: serve.engine).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Listen address (default: serve.host).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default: serve.port).")] = None,
) -> None:
    """Serve fine-tuned versions (and their bases) behind one OpenAI-compatible API, with continuous batching."""
    from tunesmith.cli.serve_command import serve_command

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server drains on SIGTERM itself (uvicorn's own handler)
    code = serve_command(references or [], config, base, engine, host, port)
    if code:
        raise typer.Exit(code)


@app.command()
def chat(
    run_dir: Annotated[str, typer.Argument(help="Run directory, or a registered version (NAME@VERSION, NAME@ALIAS).")],
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
    from rich.padding import Padding
    from rich.table import Column, Table
    from rich.text import Text

    from tunesmith.config import option_rows, options_markdown

    if markdown:
        typer.echo(options_markdown(), nl=False)
        return
    rows, console = option_rows(), Console()
    name_width = max(len(key) for key, *_ in rows)
    if console.width < name_width + 95:  # too narrow for a table that keeps option names whole: a block each
        for key, type_name, default, meaning in rows:
            console.print(Text.assemble((key, "bold"), f"  {type_name} = {default}"))
            console.print(Padding(Text(meaning), (0, 0, 0, 4)))
        return
    table = Table(Column("option", no_wrap=True, min_width=name_width), Column("type", overflow="fold", max_width=20),
                  Column("default", overflow="fold", max_width=20), Column("meaning", ratio=1),
                  title="tunesmith config options")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


class Terminated(BaseException):
    """SIGTERM (such as from `timeout` or a scheduler) outside training, which installs its own handler that saves a
    checkpoint first: unwinds like Ctrl-C, so staged folders and temp files are removed on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    """Console entry point: user errors become one red line and exit code 2, never a traceback."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from tunesmith.errors import TunesmithError

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        app()
    except TunesmithError as exc:
        from tunesmith.cli.output import print_error

        print_error(exc)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing half-written was kept", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("\nterminated (SIGTERM): nothing half-written was kept", file=sys.stderr)
        sys.exit(143)
