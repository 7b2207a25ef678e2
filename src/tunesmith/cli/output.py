"""What the CLI prints after each stage: short summaries and where every artifact went."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

console = Console()


def plain(text, style: str = ""):
    """User text as a rich Text: shown as written, whatever brackets it holds, and always encodable."""
    from rich.text import Text

    from tunesmith.data.readers import safe_text

    return Text(safe_text(str(text)), style=style)


def _styled(label: str, style: str, text: str):
    """A styled label, then user text shown as written."""
    from rich.text import Text

    return Text.assemble((label, style), plain(text))


def print_error(exc: Exception) -> None:
    """One `error:` line on stderr; the message (which quotes the user's text) is never parsed as markup."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(_styled("error: ", "bold red", str(exc)))


def prepared(run_dir: Path) -> None:
    from tunesmith.registry.run import Run

    data = Run.open(run_dir).manifest.data
    tokens = data.tokens["train"]
    console.print(_styled("prepared ", "bold green", (
        f"{run_dir}: {data.rows['train']} train / {data.rows['validation']} validation rows, "
        f"{tokens['total']:,} train tokens ({tokens['trained_share']:.0%} trained), "
        f"{tokens['truncated_examples']} truncated; data hash {data.dataset_hash[:12]}")))


def show_mask(run_dir: Path, config, count: int) -> None:
    from tunesmith.data.mask_view import mask_legend, masked_example_text
    from tunesmith.data.prepare import read_split
    from tunesmith.models import load_tokenizer
    from tunesmith.registry.run import Run

    tokenizer = load_tokenizer(Run.open(run_dir).base_source)
    console.print("[bold]Loss mask[/]: [bold green on grey11]highlighted[/] tokens are trained, [dim]dim[/] ones are not.")
    for example in read_split(run_dir, "train")[:count]:
        messages = [m.as_dict() for m in example.messages]
        console.rule(f"line {example.source_line}")
        console.print(masked_example_text(tokenizer, messages, config.data.max_length, example.tools))
        console.print(plain(mask_legend(tokenizer, messages, config.data.max_length, example.tools), "italic"))


def trained(run_dir: Path, section: dict) -> None:
    metrics = section["metrics"]
    if "reward_before" in metrics:  # GRPO: its loss says nothing about quality; the reward does
        measured = (f"reward {metrics['reward_before']} -> {metrics['reward_after']}, held-out reward "
                    f"{metrics.get('validation_reward_before')} -> {metrics.get('validation_reward_after')}")
    else:
        measured = f"train loss {metrics['train_loss']}, validation loss {metrics['validation_loss']}"
    console.print(_styled(
        "trained ", "bold green",
        f"{section['method']} ({section['precision']}, {section['threads']} threads): "
        f"{metrics['steps']} steps, {measured}, "
        f"{metrics.get('tokens_per_second', 0):,} tokens/s, {section['wall_time_s']} s -> "
        f"{Path(run_dir) / (section.get('adapter_dir') or section['model_dir'])}"))


def evaluated(run_dir: Path, report: dict) -> None:
    from tunesmith.evaluate.gates import describe_outcome
    from tunesmith.evaluate.report import lost_ground_lines, prompting_line, terminal_table

    console.print(terminal_table(report))
    for line in lost_ground_lines(report):
        console.print(plain(line, "bold red"), highlight=False)
    if prompting_line(report):
        console.print(_styled("prompting: ", "bold", prompting_line(report)))
    if report.get("overfitting", {}).get("overfitting"):
        console.print(_styled("overfitting: ", "bold yellow", report["overfitting"]["message"]))
    for outcome in report.get("gates", []):
        console.print(plain(describe_outcome(outcome), "green" if outcome["passed"] else "bold red"), highlight=False)
    console.print(_styled("report ", "bold green", f"{Path(run_dir) / 'eval' / 'report.md'} (HTML: report.html)"))


def artifacts(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    console.print("[bold]Artifacts[/]")
    for label, rel in [("run directory", ""), ("manifest", "manifest.json"), ("resolved config", "config.yaml"),
                       ("data splits", "data/"), ("adapter", "adapter/"), ("report (markdown)", "eval/report.md"),
                       ("report (JSON)", "eval/report.json"), ("predictions", "eval/predictions.jsonl")]:
        console.print(plain(f"  {label:<18} {run_dir / rel}"))
    console.print(plain(f"  serve it with      tunesmith serve {run_dir}"))
    console.print(plain(f"  version it with    tunesmith register {run_dir} --name NAME"))
