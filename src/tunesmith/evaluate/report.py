"""Rendering an evaluation report: a terminal table and markdown, every model side by side with the base, and the
run against its parent and against prompting in plain words."""

from __future__ import annotations

from rich.table import Table

# (key, label, shown as percent); metrics not listed here follow in report order.
METRICS = [
    ("exact_match", "exact match", True),
    ("exact_match_raw", "exact match (raw)", True),
    ("token_f1", "token F1", True),
    ("rouge_l", "ROUGE-L", True),
    ("accuracy", "label accuracy", True),
    ("macro_f1", "label macro-F1", True),
    ("json_valid", "valid JSON", True),
    ("json_schema", "matches JSON schema", True),
    ("regex_match", "matches regex", True),
    ("stop_rate", "stops on its own", True),
    ("validation_loss", "validation loss", False),
    ("perplexity", "perplexity", False),
    ("general_ppl", "general text perplexity", False),
    ("general_qa", "general questions right", True),
    ("judge_win_rate", "judge win rate vs base", True),
    ("mean_new_tokens", "mean answer tokens", False),
    ("seconds", "eval seconds", False),
]
LABELS = {key: label for key, label, _ in METRICS}
PERCENT = {key for key, _, percent in METRICS if percent}


def metric_keys(report: dict) -> list[str]:
    """Metrics in display order: the known ones first, then per-field, custom and harness scores."""
    present = list(dict.fromkeys(k for scores in report["results"].values() for k in scores))
    known = [key for key, _, _ in METRICS if key in present]
    return known + [key for key in present if key not in LABELS]


def metric_label(key: str) -> str:
    if key.startswith("field:"):
        return f"field `{key[6:]}` right"
    return LABELS.get(key, key)


def format_value(key: str, value) -> str:
    if value is None:
        return "-"
    if key in PERCENT or key.startswith("field:"):
        return f"{value * 100:.1f}%"
    return f"{value:.3f}"


def format_delta(key: str, comparison: dict, compact: bool = False) -> str:
    """`+12.5 pts [+8.0, +17.0] p=0.001*`: the paired difference with its interval and p-value (* significant)."""
    scale, unit = (100, " pts") if key in PERCENT or key.startswith("field:") else (1, "")
    marker = "*" if comparison["significant"] else ""
    low, high = comparison["delta_low"] * scale, comparison["delta_high"] * scale
    if compact:
        return f"{comparison['delta'] * scale:+.1f}{marker} [{low:+.1f},{high:+.1f}]"
    return f"{comparison['delta'] * scale:+.1f}{unit} [{low:+.1f}, {high:+.1f}] p={comparison['p_value']:.3g}{marker}"


def comparison_columns(report: dict) -> list[tuple[str, str, str, dict]]:
    """(heading, label, reference label, paired metrics) per comparison column: every model vs the base, then the
    run vs its parent and vs the prompting baseline."""
    results = report["results"]
    columns = [(f"{label} vs base", label, "base", report.get("comparisons", {}).get(label, {}).get("metrics", {}))
               for label in results if label != "base"] if "base" in results else []
    parent, prompting = report.get("against_parent"), report.get("against_prompting")
    if parent:
        columns.append(("fine-tuned vs parent", "fine-tuned", parent["label"], parent["metrics"]))
    if prompting:
        columns.append(("fine-tuned vs prompt-baseline", "fine-tuned", "prompt-baseline", prompting["metrics"]))
    return columns


def comparison_cell(report: dict, column: tuple[str, str, str, dict], key: str, compact: bool = False) -> str:
    """The paired difference when the metric was compared per example, else the plain difference of the two scores."""
    _, label, reference, metrics = column
    if key in metrics:
        return format_delta(key, metrics[key], compact)
    results = report["results"]
    if key in results[reference] and key in results[label] and key not in ("seconds",):
        difference = results[label][key] - results[reference][key]
        return f"{difference * 100:+.1f} pts" if key in PERCENT else f"{difference:+.3f}"
    return ""


def lost_ground_lines(report: dict) -> list[str]:
    """Each metric where the run is significantly worse than its parent, in words."""
    parent = report.get("against_parent")
    if not parent:
        return []
    name = f" ({parent['name']})" if parent.get("name") else ""
    return [f"lost ground against its parent{name}: {lost['metric']} {lost['parent']:.3f} -> {lost['child']:.3f} "
            f"({_points(lost['metric'], lost['delta'])}, significant, p={lost['p_value']:.3g})"
            for lost in parent["lost_ground"]]


def parent_verdict(report: dict) -> str | None:
    """One sentence on the run against its parent: what it lost, or that it lost nothing significant."""
    parent = report.get("against_parent")
    if not parent:
        return None
    if parent["lost_ground"]:
        metrics = ", ".join(lost["metric"] for lost in parent["lost_ground"])
        return f"The run is significantly worse than its parent on {metrics}: it lost ground."
    return "The run is not significantly worse than its parent on any compared metric."


def prompting_line(report: dict) -> str | None:
    """What fine-tuning gained over prompting the base with k examples, and the prompt tokens (and cost) it saves."""
    prompting = report.get("against_prompting")
    if not prompting:
        return None
    k, metrics = prompting["examples_per_prompt"], prompting["metrics"]
    metric = "exact_match" if "exact_match" in metrics else next(iter(metrics), None)
    gain = ""
    if metric:
        comparison = metrics[metric]
        verb = "gained" if comparison["delta"] >= 0 else "lost"
        gain = (f"fine-tuning {verb} {_points(metric, comparison['delta'])} of {metric} over prompting with {k} "
                f"{prompting['selection']} examples ({'significant' if comparison['significant'] else 'not significant'}, "
                f"p={comparison['p_value']:.3g}); ")
    return (f"{gain}it saves {prompting['extra_prompt_tokens']:.0f} prompt tokens per request, "
            f"{prompting['cost_per_million_requests']:,.2f} per 1M requests at {prompting['prompt_token_price']:g} "
            "per 1M prompt tokens")


def _points(metric: str, delta: float) -> str:
    return f"{delta * 100:+.1f} points" if metric in PERCENT or metric.startswith("field:") else f"{delta:+.3f}"


def terminal_table(report: dict) -> Table:
    labels, columns = list(report["results"]), comparison_columns(report)
    table = Table(title=f"{report['run']}: {report['examples']} held-out examples "
                        f"({report.get('confidence', 0.95):.0%} paired-bootstrap intervals, * p < {1 - report.get('confidence', 0.95):.2g})")
    table.add_column("metric")
    for name in labels:
        table.add_column(name, justify="right")
    for column in columns:
        table.add_column(column[0], justify="right", no_wrap=True)
    for key in metric_keys(report):
        cells = [format_value(key, report["results"][name].get(key)) for name in labels]
        table.add_row(metric_label(key), *cells, *[comparison_cell(report, column, key, compact=True) for column in columns])
    return table


def markdown_report(report: dict, rows: list[dict] | None = None) -> str:
    labels, columns = list(report["results"]), comparison_columns(report)
    generation = report["generation"]
    lines = [
        f"# Evaluation: {report['run']}", "",
        f"Base model: `{report['base_model']['name']}`. Held-out examples: {report['examples']}. "
        f"Data hash: `{report['data_hash'][:16]}`.",
        f"Generation: greedy, at most {generation['max_new_tokens']} new tokens, batch {generation['batch_size']}, "
        f"chat template `{generation['chat_template_sha']}` (the one used in training).",
        f"Intervals: {report.get('confidence', 0.95):.0%} paired bootstrap over examples; p: paired permutation "
        "test; * marks a significant difference.", "",
        "| metric | " + " | ".join(labels) + "".join(f" | {column[0]}" for column in columns) + " |",
        "|---|" + "---:|" * (len(labels) + len(columns)),
    ]
    for key in metric_keys(report):
        cells = [format_value(key, report["results"][name].get(key)) for name in labels]
        cells += [comparison_cell(report, column, key) for column in columns]
        lines.append(f"| {metric_label(key)} | " + " | ".join(cells) + " |")
    for label, comparison in report.get("comparisons", {}).items():
        exact = comparison["metrics"].get("exact_match")
        if exact:
            lines += ["", f"**{label} vs base, exact match per example:** {exact['wins']} wins, {exact['losses']} losses, "
                      f"{exact['ties']} ties."]
    if report.get("against_parent"):
        lines += ["", "## Against its parent", "", f"Parent: `{report['against_parent']['run_dir']}`. "
                  + parent_verdict(report)] + [f"- {line}" for line in lost_ground_lines(report)]
    if report.get("against_prompting"):
        sentence = prompting_line(report)
        lines += ["", "## Against prompting", "", sentence[0].upper() + sentence[1:] + "."]
    lines += _difference_lines(report, rows or [])
    lines += ["", "## Overfitting", "", report["overfitting"]["message"] + "."]
    for label, verdict in report.get("judge", {}).items():
        lines += ["", f"## Judge: {label} vs base", "",
                  f"Judge `{verdict['model']}`, {verdict['judged']} examples, each asked in both orders: "
                  f"{verdict['wins']} wins, {verdict['losses']} losses, {verdict['ties']} ties, {verdict['invalid']} "
                  f"unreadable; win rate {format_value('judge_win_rate', verdict['win_rate'])}, position agreement "
                  f"{format_value('judge_win_rate', verdict['position_agreement'])}, agreement with exact match "
                  f"{format_value('judge_win_rate', verdict['metric_agreement'])}."]
    if report.get("gates"):
        from tunesmith.evaluate.gates import describe_outcome

        lines += ["", "## Gates", ""] + [f"- {describe_outcome(outcome)}" for outcome in report["gates"]]
    lines += ["", "Per-example answers: `predictions.jsonl`; loss curves and answer diffs: `report.html`."]
    return "\n".join(lines) + "\n"


def _difference_lines(report: dict, rows: list[dict]) -> list[str]:
    """Markdown for the examples where each candidate gained or lost most against the base."""
    lines = []
    for label, comparison in report.get("comparisons", {}).items():
        picked = [("gained", i) for i in comparison.get("gained", [])] + [("lost", i) for i in comparison.get("lost", [])]
        if not picked or not rows:
            continue
        lines += ["", f"### Where {label} differs most from base", ""]
        for kind, index in picked:
            row = rows[index]
            lines.append(f"- {kind}, data line {row['line']}: `{_clip(row['prompt'])}` -> base `{_clip(row['base']['text'])}`, "
                         f"{label} `{_clip(row[label]['text'])}` (reference `{_clip(row['reference'])}`)")
    return lines


def _clip(text: str, width: int = 80) -> str:
    text = " ".join(text.split()).replace("`", "'")
    return text if len(text) <= width else text[: width - 1] + "…"


def html_report(report: dict, rows: list[dict]) -> str:
    from tunesmith.evaluate.html_report import render_html

    return render_html(report, rows)
