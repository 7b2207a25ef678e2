"""Rendering an evaluation report: a terminal table and markdown, base and fine-tuned side by side."""

from __future__ import annotations

from rich.table import Table

# (key, label, shown as percent, higher is better)
METRICS = [
    ("exact_match", "exact match", True, True),
    ("json_valid", "valid JSON", True, True),
    ("stop_rate", "stops on its own", True, True),
    ("validation_loss", "validation loss", False, False),
    ("perplexity", "perplexity", False, False),
    ("mean_new_tokens", "mean answer tokens", False, None),
    ("seconds", "eval seconds", False, None),
]


def _rows(report: dict):
    results = report["results"]
    labels = list(results)
    for key, label, percent, _ in METRICS:
        if not all(key in results[name] for name in labels):
            continue
        values = [results[name][key] for name in labels]
        cells = [f"{v * 100:.1f}%" if percent else f"{v:.3f}" for v in values]
        delta = ""
        if len(values) == 2:
            diff = values[1] - values[0]
            delta = f"{diff * 100:+.1f} pts" if percent else f"{diff:+.3f}"
        yield label, cells, delta


def terminal_table(report: dict) -> Table:
    labels = list(report["results"])
    table = Table(title=f"{report['run']}: {report['examples']} held-out examples")
    table.add_column("metric")
    for name in labels:
        table.add_column(name, justify="right")
    if len(labels) == 2:
        table.add_column("change", justify="right")
    for label, cells, delta in _rows(report):
        table.add_row(label, *cells, *([delta] if len(labels) == 2 else []))
    return table


def markdown_report(report: dict) -> str:
    labels = list(report["results"])
    two = len(labels) == 2
    lines = [
        f"# Evaluation: {report['run']}", "",
        f"Base model: `{report['base_model']['name']}`. Held-out examples: {report['examples']}. "
        f"Data hash: `{report['data_hash'][:16]}`.",
        f"Generation: greedy, at most {report['generation']['max_new_tokens']} new tokens, "
        f"chat template `{report['generation']['chat_template_sha']}` (the one used in training).", "",
        "| metric | " + " | ".join(labels) + (" | change |" if two else " |"),
        "|---|" + "---:|" * (len(labels) + two),
    ]
    for label, cells, delta in _rows(report):
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {delta} |" if two else " |"))
    lines += ["", "Per-example answers: `predictions.jsonl`."]
    return "\n".join(lines) + "\n"
