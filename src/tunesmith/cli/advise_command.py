"""`tunesmith advise CONFIG`: before training for real, is fine-tuning worth it, would prompting do, or is more data
the next step?

Read top to bottom: prepare the data into a scratch run directory (`<output_dir>/<name>-advise`) -> hold out N
validation examples -> score the base model zero-shot and with k few-shot examples -> train short LoRA runs on 25%,
50% and 100% of the training split (the same step budget each, so the curve measures data, not compute) -> score
them on the same examples -> the verdict of evaluate/advise.py's decision rule, as a table and one plain sentence.
"""

from __future__ import annotations

import json
import random
import sys
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith.cli.data_commands import user_errors

DEFAULT_EXAMPLES = 40
DEFAULT_SHOTS = 4
DEFAULT_STEPS = 30
ADVICE_FILE = "advice.json"


def advise_command(
    config: Annotated[Path, typer.Argument(help="YAML config (see `tunesmith options` for every key).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Config overrides such as train.lora.r=32.")] = None,
    examples: Annotated[int, typer.Option("--examples", help="Held-out examples every contender is scored on.")]
    = DEFAULT_EXAMPLES,
    shots: Annotated[Optional[int], typer.Option("--shots", help="Few-shot examples in the prompting baseline "
                                                                 "(default: evaluate.prompt_baseline, else 4).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Most optimizer steps of each short LoRA run (fewer when the "
                                                       "config trains less).")] = DEFAULT_STEPS,
    as_json: Annotated[bool, typer.Option("--json", help="Print the advice as JSON (progress goes to stderr).")] = False,
) -> None:
    """Was fine-tuning worth it? Base model prompted vs short LoRA runs on 25/50/100% of the data, then a verdict."""
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError

    with user_errors():
        settings = load_config(config, overrides or [])
        if examples < 1 or steps < 1 or (shots is not None and shots < 0):
            raise TunesmithError("advise: --examples and --steps must be 1 or more and --shots 0 or more "
                                 f"(got {examples}, {steps}, {shots})")
        if settings.train.method != "sft":
            raise TunesmithError(f"{config}: advise weighs SFT against prompting, but train.method is "
                                 f"{settings.train.method}; run it on an SFT config (train.method=sft)")
        k = shots if shots is not None else (settings.evaluate.prompt_baseline or DEFAULT_SHOTS)
        with redirect_stdout(sys.stderr) if as_json else nullcontext():
            advice, run_dir = run_advise(settings, examples, k, steps)
    if as_json:
        typer.echo(json.dumps({**advice.as_dict(), "run_dir": str(run_dir)}, indent=2))
    else:
        print_advice(advice, run_dir)


def run_advise(settings, examples: int, shots: int, steps: int):
    """Every measurement the advice needs; returns it and the scratch run directory (which holds advice.json)."""
    from tunesmith.cli.output import console, plain
    from tunesmith.data.prepare import read_split
    from tunesmith.evaluate.advise import decide, mean, task_metric
    from tunesmith.evaluate.prompt_baseline import cost_per_million_requests
    from tunesmith.registry.run_dir import write_json_atomic

    run_dir = _prepare_scratch(settings)
    train, held_out = read_split(run_dir, "train"), read_split(run_dir, "validation")[:examples]
    if len(held_out) < examples:
        console.print(plain(f"note: the validation split holds {len(held_out)} examples, fewer than --examples "
                            f"{examples}; scoring on all of them", "yellow"))
    zero_shot, few_shot, extra_tokens = _score_prompting(run_dir, settings, train, held_out, shots)
    console.print(plain(f"base model: zero-shot {mean(zero_shot):.0%}, {shots}-shot {mean(few_shot):.0%} "
                        f"{task_metric(settings.evaluate)} on {len(held_out)} held-out examples"))
    curve = _learning_curve(run_dir, settings, held_out, len(train), steps)
    advice = decide(task_metric(settings.evaluate), mean(zero_shot), mean(few_shot), shots, curve, extra_tokens,
                    cost_per_million_requests(extra_tokens, settings.evaluate.prompt_token_price))
    write_json_atomic(run_dir / ADVICE_FILE, {**advice.as_dict(), "held_out_examples": len(held_out)})
    return advice, run_dir


def _prepare_scratch(settings) -> Path:
    """The config's data prepared as `tunesmith prepare` would, into `<output_dir>/<name>-advise` (replaced)."""
    from tunesmith.cli import output
    from tunesmith.data.prepare import prepare

    # Replay guards a real run against forgetting; these probes only measure the task, so none is generated.
    data = settings.data.model_copy(update={"replay": settings.data.replay.model_copy(update={"share": 0.0})})
    run_dir = prepare(settings.model_copy(update={"name": f"{settings.name}-advise", "data": data}), overwrite=True)
    output.prepared(run_dir)
    return run_dir


def _score_prompting(run_dir: Path, settings, train, held_out, shots: int):
    """Per-example task scores of the base model zero-shot and with `shots` examples, and the tokens those add."""
    from tunesmith.data.template import end_of_turn_token_ids
    from tunesmith.evaluate.advise import task_scores
    from tunesmith.evaluate.prompt_baseline import check_fits_context, extra_prompt_tokens, few_shot_conversations
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.progress_display import LoggedProgress
    from tunesmith.registry.run import Run

    source = Run.open(run_dir).base_source
    tokenizer, model = load_tokenizer(source), load_model(source)
    stop_ids, evaluate = end_of_turn_token_ids(tokenizer), settings.evaluate
    plain = [example.prompt_messages() for example in held_out]
    few_shot = few_shot_conversations(train, held_out, shots, evaluate.prompt_baseline_selection, settings.seed)
    check_fits_context(tokenizer, few_shot, evaluate.max_new_tokens,
                       getattr(model.config, "max_position_embeddings", None), shots)
    scores, variants = [], [("zero-shot", plain)] + ([(f"{shots}-shot", few_shot)] if shots else [])
    with LoggedProgress(transient=True) as progress:
        for label, conversations in variants:
            task = progress.add_task(f"base model, {label}", total=len(held_out))
            scores.append(task_scores(model, tokenizer, conversations, held_out, stop_ids, evaluate,
                                      on_answer=lambda n, t=task: progress.advance(t, n)))
    return scores[0], scores[-1], extra_prompt_tokens(tokenizer, plain, few_shot)


def _learning_curve(run_dir: Path, settings, held_out, train_rows: int, step_budget: int):
    """Short LoRA runs on nested shares of the training split, each scored on the held-out examples."""
    from tunesmith.cli.output import console, plain
    from tunesmith.evaluate.advise import SHARES, CurvePoint, mean, share_sizes
    from tunesmith.train.batches import StepPlan

    train_settings = settings.train
    global_batch = train_settings.batch_size * train_settings.grad_accum
    configured = StepPlan(train_rows, global_batch, settings.seed).total_steps(train_settings.epochs,
                                                                              train_settings.max_steps)
    steps = min(step_budget, configured)
    sizes = share_sizes(train_rows)
    console.print(plain(f"learning curve: {len(SHARES)} LoRA runs of {steps} steps x {global_batch} examples on "
                        + ", ".join(f"{share:.0%} ({size} rows, {steps * global_batch / size:.1f} epochs)"
                                    for share, size in zip(SHARES, sizes))
                        + f" of the training split (the config trains {configured} steps on 100%)"))
    files = _share_files(run_dir, sizes, settings.seed, len(held_out))
    share_runs = [_train_share(run_dir, settings, share, path, files["held_out"], steps)
                  for share, path in zip(SHARES, files["shares"])]
    scores = _score_adapters(run_dir, settings, held_out, share_runs)
    return tuple(CurvePoint(share, size, steps, mean(values)) for share, size, values in zip(SHARES, sizes, scores))


def _share_files(run_dir: Path, sizes: list[int], seed: int, held_out: int) -> dict:
    """The prepared splits' rows written as the shares' data files: nested training subsets and the held-out rows."""
    from tunesmith.registry.run_dir import write_text_atomic

    train_lines = (run_dir / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    held_out_lines = (run_dir / "data" / "validation.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    order = list(range(len(train_lines)))
    random.Random(seed).shuffle(order)
    folder = run_dir / "advise-data"
    folder.mkdir(exist_ok=True)
    files = {"shares": [], "held_out": folder / "held_out.jsonl"}
    write_text_atomic(files["held_out"], "".join(held_out_lines[:held_out]))
    for size in sizes:
        path = folder / f"train-{size}.jsonl"
        write_text_atomic(path, "".join(train_lines[index] for index in sorted(order[:size])))
        files["shares"].append(path)
    return files


def _train_share(run_dir: Path, settings, share: float, data_file: Path, held_out_file: Path, steps: int) -> Path:
    """Prepare and train one share's run inside the scratch run directory; returns its run directory."""
    from tunesmith.data.prepare import prepare
    from tunesmith.train.loop import TrainingStopped
    from tunesmith.train.sft import train_sft

    # The rows are already cleaned, deduplicated and weighted (repeats kept on purpose) by the scratch prepare.
    data = settings.data.model_copy(update={"train": data_file, "validation": held_out_file, "sources": [],
                                            "format": "chat", "dedup": "off", "benchmark_files": [],
                                            "replay": settings.data.replay.model_copy(update={"share": 0.0})})
    adapter = settings.train.adapter if settings.train.adapter in ("lora", "dora", "qlora") else "lora"
    # One validation loss at the end, no checkpoints, from the base model: a short probe, not a run to keep.
    train = settings.train.model_copy(update={"max_steps": steps, "eval_steps": steps, "checkpoint_steps": 0,
                                              "early_stopping_patience": None, "init_from": None, "adapter": adapter})
    share_config = settings.model_copy(update={"name": f"share-{share:.0%}".replace("%", ""), "output_dir": run_dir,
                                               "data": data, "train": train})
    share_dir = prepare(share_config, overwrite=True)
    try:
        train_sft(share_dir, share_config)
    except TrainingStopped as stop:
        print(f"advise {stop} while training on {share:.0%} of the data; nothing of {run_dir} is needed, run "
              "advise again to start over", file=sys.stderr)
        raise typer.Exit(130) from None
    return share_dir


def _score_adapters(run_dir: Path, settings, held_out, share_runs: list[Path]) -> list[list[float]]:
    """Per-example task scores of each share's adapter, all attached to one copy of the base model."""
    from tunesmith.data.template import end_of_turn_token_ids
    from tunesmith.evaluate.advise import task_scores
    from tunesmith.models import answering_as, attach_adapter, load_model, load_tokenizer
    from tunesmith.progress_display import LoggedProgress
    from tunesmith.registry.run import Run

    source = Run.open(run_dir).base_source
    tokenizer, model = load_tokenizer(source), load_model(source)
    stop_ids = end_of_turn_token_ids(tokenizer)
    for number, share_dir in enumerate(share_runs):
        model = attach_adapter(model, Run.open(share_dir).weights_dir, f"share_{number}")
    model.eval()
    plain = [example.prompt_messages() for example in held_out]
    scores = []
    with LoggedProgress(transient=True) as progress:
        for number, share_dir in enumerate(share_runs):
            task = progress.add_task(f"LoRA {share_dir.name}", total=len(held_out))
            with answering_as(model, f"share_{number}") as active:
                scores.append(task_scores(active, tokenizer, plain, held_out, stop_ids, settings.evaluate,
                                          on_answer=lambda n, t=task: progress.advance(t, n)))
    return scores


def print_advice(advice, run_dir: Path) -> None:
    """The scores side by side, the fitted curve, and the verdict in one sentence."""
    from rich.table import Table

    from tunesmith.cli.output import console, plain
    from tunesmith.evaluate.advise import FINE_TUNE, PROMPT, pct, points

    table = Table("contender", "training examples", "steps", advice.metric, title="fine-tune or prompt?")
    table.add_row("base model, zero-shot", "-", "-", pct(advice.zero_shot))
    if advice.shots:
        table.add_row(f"base model, {advice.shots}-shot (+{advice.extra_prompt_tokens:.0f} prompt tokens)", "-", "-",
                      pct(advice.few_shot))
    for point in advice.curve:
        table.add_row(f"LoRA on {point.share:.0%} of the data", str(point.examples), str(point.steps), pct(point.score))
    console.print(table)
    console.print(plain(f"learning curve: {points(advice.gain_per_doubling)} points per doubling of the data; about "
                        f"{pct(advice.projected_at_double)} expected with twice as much"))
    style = {PROMPT: "bold yellow", FINE_TUNE: "bold green"}.get(advice.verdict, "bold cyan")
    console.print(plain(advice.reason, style))
    console.print(plain(f"scratch runs and {ADVICE_FILE}: {run_dir} (safe to delete)", "dim"))
