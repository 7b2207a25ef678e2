"""A self-contained HTML report: metrics with intervals, loss curves (inline SVG), gates and per-example diffs."""

from __future__ import annotations

import difflib
import re
from html import escape

from tunesmith.evaluate.report import (
    comparison_cell,
    comparison_columns,
    format_value,
    lost_ground_lines,
    metric_keys,
    metric_label,
    parent_verdict,
    prompting_line,
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}.pass{color:#070}.fail{color:#b00;font-weight:bold}
del{background:#fdd;text-decoration:line-through}ins{background:#dfd;text-decoration:none}
.example{border:1px solid #ddd;border-radius:6px;padding:.6rem;margin:.6rem 0}.answer{font-family:monospace;white-space:pre-wrap}
.warn{background:#fff3cd;padding:.5rem}svg text{font-size:11px}
"""
CURVE_COLORS = {"train": "#1f77b4", "validation": "#d62728"}


def loss_curve_svg(train: list[dict], validation: list[dict], width: int = 640, height: int = 260) -> str:
    """Training (and validation, when recorded) loss against step, as an inline SVG line chart."""
    series = {name: points for name, points in (("train", train), ("validation", validation)) if points}
    if not series:
        return "<p>No loss curve was recorded for this run.</p>"
    points = [p for curve in series.values() for p in curve]
    max_step, max_loss = max(p["step"] for p in points) or 1, max(p["loss"] for p in points) or 1
    pad = 40

    def xy(point: dict) -> str:
        x = pad + (width - 2 * pad) * point["step"] / max_step
        y = height - pad - (height - 2 * pad) * point["loss"] / max_loss
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="loss curves">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="{width / 2}" y="{height - 8}">step (max {max_step})</text>',
             f'<text x="4" y="{pad - 8}">loss (max {max_loss:.3g})</text>']
    for index, (name, curve) in enumerate(series.items()):
        color = CURVE_COLORS[name]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(xy(p) for p in curve)}"/>')
        parts.append(f'<text x="{width - pad - 90}" y="{pad + 14 * index}" fill="{color}">{name} loss</text>')
    parts.append("</svg>")
    return "".join(parts)


def word_diff(reference: str, answer: str) -> str:
    """The answer against the reference, word by word: missing words struck through, extra words highlighted."""
    ref_words, answer_words = re.findall(r"\S+|\s+", reference), re.findall(r"\S+|\s+", answer)
    out = []
    for op, a1, a2, b1, b2 in difflib.SequenceMatcher(None, ref_words, answer_words, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(escape("".join(ref_words[a1:a2])))
            continue
        if a2 > a1:
            out.append(f"<del>{escape(''.join(ref_words[a1:a2]))}</del>")
        if b2 > b1:
            out.append(f"<ins>{escape(''.join(answer_words[b1:b2]))}</ins>")
    return "".join(out)


def _metrics_table(report: dict) -> str:
    labels, columns = list(report["results"]), comparison_columns(report)
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    head += "".join(f"<th>{escape(column[0])}</th>" for column in columns)
    body = []
    for key in metric_keys(report):
        cells = []
        for label in labels:
            value = format_value(key, report["results"][label].get(key))
            low_high = report.get("intervals", {}).get(label, {}).get(key)
            title = f' title="{report.get("confidence", 0.95):.0%} interval {format_value(key, low_high[0])} - {format_value(key, low_high[1])}"' if low_high else ""
            cells.append(f"<td{title}>{value}</td>")
        cells += [f"<td>{escape(comparison_cell(report, column, key))}</td>" for column in columns]
        body.append(f"<tr><td>{escape(metric_label(key))}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"


def _examples_section(report: dict, rows: list[dict]) -> str:
    labels = list(report["results"])
    shown = []
    for label, comparison in report.get("comparisons", {}).items():
        for kind in ("gained", "lost"):
            shown += [(f"{label} {kind} vs base", index) for index in comparison.get(kind, [])]
    if not shown:
        shown = [("example", index) for index in range(min(5, len(rows)))]
    blocks = []
    for title, index in shown:
        row = rows[index]
        answers = "".join(
            f"<div><b>{escape(label)}</b> ({'right' if row[label]['exact_match'] else 'wrong'}, F1 {row[label]['token_f1']:.2f}): "
            f"<span class='answer'>{word_diff(row['reference'], row[label]['text'])}</span></div>" for label in labels)
        blocks.append(f"<div class='example'><div><i>{escape(title)}</i>, data line {row['line']}</div>"
                      f"<div><b>prompt</b>: {escape(row['prompt'])}</div>"
                      f"<div><b>reference</b>: <span class='answer'>{escape(row['reference'])}</span></div>{answers}</div>")
    return "".join(blocks)


def _lineage_section(report: dict) -> str:
    """The run against its parent (lost ground in red) and against prompting, in words."""
    parts = []
    if report.get("against_parent"):
        lost = "".join(f"<li class='fail'>{escape(line)}</li>" for line in lost_ground_lines(report))
        parts.append(f"<h2>Against its parent</h2><p>Parent <code>{escape(report['against_parent']['run_dir'])}</code>. "
                     f"{escape(parent_verdict(report))}</p>{f'<ul>{lost}</ul>' if lost else ''}")
    if report.get("against_prompting"):
        parts.append(f"<h2>Against prompting</h2><p>{escape(prompting_line(report))}.</p>")
    return "".join(parts)


def render_html(report: dict, rows: list[dict]) -> str:
    overfitting = report["overfitting"]
    gates = "".join(
        f"<li class='{'pass' if g['passed'] else 'fail'}'>{'passed' if g['passed'] else 'FAILED'}: {escape(g['model'])} "
        f"{escape(g['gate'])}: {g['value']:.4g} vs {g['threshold']:.4g} (margin {g['margin']:+.4g})</li>"
        for g in report.get("gates", []))
    judge = "".join(
        f"<p>Judge <code>{escape(v['model'])}</code> on {escape(label)} vs base: {v['wins']} wins, {v['losses']} losses, "
        f"{v['ties']} ties, {v['invalid']} unreadable; position agreement {format_value('judge_win_rate', v['position_agreement'])}.</p>"
        for label, v in report.get("judge", {}).items())
    generation = report["generation"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {escape(report['run'])}</title><style>{STYLE}</style></head>
<body><h1>Evaluation: {escape(report['run'])}</h1>
<p>Base model <code>{escape(report['base_model']['name'])}</code>, {report['examples']} held-out examples, data hash
<code>{escape(report['data_hash'][:16])}</code>. Greedy generation, at most {generation['max_new_tokens']} new tokens,
chat template <code>{escape(generation['chat_template_sha'])}</code>. Hover a value for its {report.get('confidence', 0.95):.0%}
bootstrap interval; differences are paired, with a paired permutation test (* significant).</p>
{_metrics_table(report)}
{_lineage_section(report)}
{f"<h2>Gates</h2><ul>{gates}</ul>" if gates else ""}
<h2>Loss curves</h2>{loss_curve_svg(overfitting['train_curve'], overfitting['validation_curve'])}
<p class="{'warn' if overfitting['overfitting'] else ''}">Overfitting check: {escape(overfitting['message'])}.</p>
{f"<h2>LLM judge</h2>{judge}" if judge else ""}
<h2>Examples</h2><p>Answers diffed against the reference: <del>missing</del>, <ins>extra</ins>.</p>
{_examples_section(report, rows)}
</body></html>
"""
