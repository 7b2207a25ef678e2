"""A `MonitorReport` for people and machines: a terminal summary with verdicts in plain words, a self-contained
HTML page (charts inlined as PNG), the JSON report, and Prometheus gauges for node_exporter's textfile collector.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.monitor.run import MonitorReport

SHOWN_WINDOW_ROWS = 40
VERDICT_STYLES = {"significant": "bold red", "moderate": "yellow", "stable": "green", "unknown": "dim"}
DRIFT_LEVELS = {"unknown": -1, "stable": 0, "moderate": 1, "significant": 2}
QUALITY_GAUGES = (
    ("requests", "requests", "Requests the arm answered in the period."),
    ("error_rate", "server_error_rate", "Share of requests answered with status >= 500."),
    ("client_error_rate", "client_error_rate", "Share of requests answered 4xx."),
    ("stop_rate", "stop_rate", "Share of answers that ended with finish_reason stop."),
    ("empty_rate", "empty_rate", "Share of empty answers."),
    ("refusal_rate", "refusal_rate", "Share of answers that refuse."),
    ("json_valid_rate", "json_valid_rate", "Share of checked answers that parse as JSON."),
    ("schema_valid_rate", "schema_valid_rate", "Share of answers that validate against the --json-schema."),
    ("regex_match_rate", "regex_match_rate", "Share of answers that the --regex fully matches."),
    ("latency_p50_seconds", "latency_p50", "Median latency of answered requests."),
    ("latency_p95_seconds", "latency_p95", "95th percentile latency of answered requests."),
    ("ttft_p50_seconds", "ttft_p50", "Median time to first token of streamed answers."),
)
QUALITY_COLUMNS = (("requests", "requests", "{:,}"), ("5xx", "server_error_rate", "{:.1%}"),
                   ("4xx", "client_error_rate", "{:.1%}"), ("stop", "stop_rate", "{:.1%}"),
                   ("chars", "answer_chars", "{:,.0f}"), ("empty", "empty_rate", "{:.1%}"),
                   ("refusal", "refusal_rate", "{:.1%}"), ("JSON valid", "json_valid_rate", "{:.1%}"),
                   ("schema valid", "schema_valid_rate", "{:.1%}"), ("regex match", "regex_match_rate", "{:.1%}"),
                   ("p50 s", "latency_p50", "{:.2f}"), ("p95 s", "latency_p95", "{:.2f}"),
                   ("TTFT p50 s", "ttft_p50", "{:.2f}"))
FORMAT_COLUMNS = ("schema_valid_rate", "regex_match_rate")
"""Shown only when `--json-schema` or `--regex` checked them."""


# --- terminal ---------------------------------------------------------------------------------------------------

def print_summary(report: MonitorReport, console) -> None:
    """The report on a rich console: what was compared, the verdicts, and the tables behind them."""
    from rich.table import Table
    from rich.text import Text

    def line(text: str, style: str = "") -> None:
        console.print(Text(text, style=style), highlight=False)

    line(f"monitor {report.model}: {report.requests:,} requests from {report.first_request} to "
         f"{report.last_request} (windows of {report.window}); log {report.log_dir}", "bold")
    line(f"reference: {report.reference.description}")
    if _format_text(report):
        line(_format_text(report))
    drift = report.drift
    line(drift.summary, VERDICT_STYLES[drift.verdict])
    if drift.drift_starts:
        line(f"  {_drift_start_text(report)}", VERDICT_STYLES["significant"])
    for note in drift.notes:
        line(f"  note: {note}", "dim")
    if drift.features:
        table = Table("feature", "PSI", "band", "KS", "KS p", "training mean", "production mean",
                      title=f"prompt statistics ({drift.token_unit})")
        for f in drift.features:
            table.add_row(f.feature, f"{f.psi:.3f}", Text(f.band, VERDICT_STYLES[f.band]), f"{f.ks_statistic:.3f}",
                          f"{f.ks_pvalue:.2g}", f"{f.train_mean:,.2f}", f"{f.production_mean:,.2f}")
        console.print(table)
    if any(w.psi for w in drift.windows):
        table = Table("window", "prompts", "PSI tokens", "PSI tokens vs first", "AUC vs training", "AUC vs first",
                      "verdict", title="drift per window")
        for w in drift.windows:
            table.add_row(w.start, f"{w.prompts:,}", _figure(w.psi.get("prompt_tokens")),
                          _figure(w.psi_vs_first.get("prompt_tokens")), _figure(w.domain_auc),
                          _figure(w.domain_auc_vs_first), Text(w.verdict, VERDICT_STYLES[w.verdict]))
        console.print(table)
    if drift.domain:
        line("production prompts most unlike training:")
        for number, prompt in enumerate(drift.domain.top_prompts, 1):
            line(f"  {number}. {_clip(prompt.text)} ({prompt.score:.2f})")
        line("words that mark production: " + (", ".join(w.word for w in drift.domain.production_words) or "none"))
        line("words production lacks: " + (", ".join(w.word for w in drift.domain.training_words) or "none"))
    console.print(_quality_table(Table, [r for r in report.quality if r.window is None], "quality per arm"))
    per_window = [r for r in report.quality if r.window is not None]
    if len({r.window for r in per_window}) > 1:
        shown = per_window[-SHOWN_WINDOW_ROWS:]
        title = "quality per window and arm" + (f" (last {len(shown)} rows; --html has all)"
                                                 if len(shown) < len(per_window) else "")
        console.print(_quality_table(Table, shown, title))
    _print_feedback(report, console, Table, line)
    failed = report.failed_checks
    if failed:
        line(f"quality: {len(failed)} of {len(report.checks)} checks failed: "
             + "; ".join(f"{c.arm} {c.check} {c.value:g} (limit {c.threshold:g})" for c in failed), "bold red")
    else:
        line(f"quality: all {len(report.checks)} checks passed", "green")


def _drift_start_text(report: MonitorReport) -> str:
    if report.drift_failed:
        return f"drift starts in the window from {report.drift.drift_starts}"
    return (f"the window from {report.drift.drift_starts} drifted, though the whole period did not; --since a "
            "shorter span judges the recent traffic alone")


def _format_text(report: MonitorReport) -> str:
    """What answers were checked against beyond JSON, or "" when nothing was."""
    given = ([f"the JSON Schema {report.json_schema}"] if report.json_schema else []) + (
        [f"the pattern {report.regex!r} (full match)"] if report.regex is not None else [])
    return "answers checked against " + " and ".join(given) if given else ""


def _quality_columns(rows) -> list[tuple[str, str, str]]:
    """The quality columns, less the format checks no row has a figure for."""
    return [column for column in QUALITY_COLUMNS
            if column[1] not in FORMAT_COLUMNS or any(getattr(row, column[1]) is not None for row in rows)]


def _quality_table(table_type, rows, title: str):
    columns = _quality_columns(rows)
    table = table_type("window", "arm", *(label for label, _, _ in columns), title=title)
    for row in rows:
        cells = [_figure(getattr(row, key), shape) for _, key, shape in columns]
        table.add_row(row.window or "all", row.arm, *cells)
    return table


def _print_feedback(report: MonitorReport, console, table_type, line) -> None:
    feedback = report.feedback
    if feedback.arms:
        table = table_type("arm", "positive", "negative", "neutral", "negative rate", title="feedback")
        for row in feedback.arms:
            table.add_row(row.arm, str(row.positive), str(row.negative), str(row.neutral),
                          _figure(row.negative_rate, "{:.1%}"))
        console.print(table)
    else:
        line("feedback: none for these requests")
    if feedback.unmatched:
        line(f"feedback: {feedback.unmatched} record(s) name a completion id not in the log read (a request before "
             "--since, or a wrong id); not counted", "yellow")


def _figure(value, shape: str = "{:.3f}") -> str:
    return "-" if value is None else shape.format(value)


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- files ------------------------------------------------------------------------------------------------------

def write_json(report: MonitorReport, path: Path) -> None:
    _write(path, report.model_dump_json(indent=2) + "\n", "--json")


def write_html(report: MonitorReport, path: Path) -> None:
    _write(path, render_html(report), "--html")


def _write(path: Path, text: str, option: str) -> None:
    from tunesmith.registry.run_dir import write_text_atomic

    try:
        write_text_atomic(Path(path), text)
    except OSError as exc:
        raise TunesmithError(f"{option} {path}: cannot write it ({exc.strerror or exc}); choose a writable "
                             "path") from None


def write_prometheus(report: MonitorReport, path: Path) -> None:
    """Gauges for node_exporter's textfile collector (written to a temp file, then renamed)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()

    def gauge(name: str, help_text: str, labels: tuple[str, ...]) -> Gauge:
        return Gauge(f"tunesmith_monitor_{name}", help_text, ("model", *labels), registry=registry)

    model = report.model
    drift = report.drift
    gauge("input_drift", "Input drift verdict: -1 unknown, 0 stable, 1 moderate, 2 significant.", ()).labels(
        model).set(DRIFT_LEVELS[drift.verdict])
    psi, ks = gauge("psi", "PSI of a prompt statistic, training vs production.", ("feature",)), gauge(
        "ks_statistic", "Two-sample KS statistic of a prompt statistic.", ("feature",))
    for feature in drift.features:
        psi.labels(model, feature.feature).set(feature.psi)
        ks.labels(model, feature.feature).set(feature.ks_statistic)
    if drift.domain:
        gauge("domain_auc", "Cross-validated ROC AUC of the production-vs-training prompt classifier.", ()).labels(
            model).set(drift.domain.auc)
    for name, key, help_text in QUALITY_GAUGES:
        metric = gauge(name, help_text, ("served",))
        for row in report.quality:
            if row.window is None and getattr(row, key) is not None:
                metric.labels(model, row.arm).set(getattr(row, key))
    negative = gauge("negative_feedback_rate", "Share of feedback ratings that are negative.", ("served",))
    for row in report.feedback.arms:
        negative.labels(model, row.arm).set(row.negative_rate)
    gauge("feedback_unmatched", "Feedback naming a completion id not in the log read.", ()).labels(model).set(
        report.feedback.unmatched)
    gauge("failed_checks", "Quality checks that crossed their threshold.", ()).labels(model).set(
        len(report.failed_checks))
    gauge("last_run_timestamp_seconds", "When this report was made.", ()).labels(model).set_to_current_time()
    try:
        write_to_textfile(str(path), registry)
    except OSError as exc:
        raise TunesmithError(f"--prom {path}: cannot write it ({exc.strerror or exc}); choose a writable path "
                             "(node_exporter's --collector.textfile.directory)") from None


# --- HTML -------------------------------------------------------------------------------------------------------

def render_html(report: MonitorReport) -> str:
    """One self-contained page: verdicts, charts (base64 PNG), and every table of the terminal summary."""
    drift, e = report.drift, html.escape
    parts = [f"<h1>tunesmith monitor: {e(report.model)}</h1>",
             f"<p>{report.requests:,} requests from {e(report.first_request)} to {e(report.last_request)}, windows "
             f"of {e(report.window)}; log {e(report.log_dir)}<br>reference: {e(report.reference.description)}"
             + (f"<br>{e(_format_text(report))}" if _format_text(report) else "") + "</p>",
             f"<p class='{drift.verdict}'><b>{e(drift.summary)}</b>"
             + (f"<br>{e(_drift_start_text(report))}" if drift.drift_starts else "")
             + "".join(f"<br><i>{e(note)}</i>" for note in drift.notes) + "</p>"]
    failed = report.failed_checks
    parts.append(f"<p class='{'significant' if failed else 'stable'}'><b>quality: "
                 + (f"{len(failed)} of {len(report.checks)} checks failed</b>: " + e("; ".join(
                     f"{c.arm} {c.check} {c.value:g} (limit {c.threshold:g})" for c in failed))
                    if failed else f"all {len(report.checks)} checks passed</b>") + "</p>")
    if any(r.window for r in report.quality):
        parts += ["<h2>Quality over time</h2>", _image(_quality_chart(report))]
    parts += ["<h2>Quality per arm</h2>", _quality_html([r for r in report.quality if r.window is None])]
    if drift.features:
        parts += [f"<h2>Input drift</h2><p>prompt statistics in {e(drift.token_unit)}</p>",
                  _html_table(("feature", "PSI", "band", "KS", "KS p", "training mean", "production mean"),
                              [(f.feature, f"{f.psi:.3f}", f.band, f"{f.ks_statistic:.3f}", f"{f.ks_pvalue:.2g}",
                                f"{f.train_mean:,.2f}", f"{f.production_mean:,.2f}") for f in drift.features]),
                  _image(_histograms(report))]
    if any(w.psi for w in drift.windows):
        parts += ["<h2>Drift per window</h2>", _image(_drift_chart(report)),
                  _html_table(("window", "prompts", "PSI tokens", "PSI tokens vs first", "AUC vs training",
                               "AUC vs first", "verdict"),
                              [(w.start, f"{w.prompts:,}", _figure(w.psi.get("prompt_tokens")),
                                _figure(w.psi_vs_first.get("prompt_tokens")), _figure(w.domain_auc),
                                _figure(w.domain_auc_vs_first), w.verdict) for w in drift.windows])]
    if drift.domain:
        domain = drift.domain
        parts += [f"<h2>Domain classifier</h2><p>ROC AUC {domain.auc:.3f} ({domain.train_prompts:,} training vs "
                  f"{domain.production_prompts:,} production prompts)</p>",
                  _html_table(("production prompt most unlike training", "score"),
                              [(p.text, f"{p.score:.3f}") for p in domain.top_prompts]),
                  _html_table(("words that mark production", "weight", "words production lacks", "weight"),
                              _side_by_side(domain.production_words, domain.training_words))]
    parts += ["<h2>Quality per window and arm</h2>", _quality_html([r for r in report.quality if r.window])]
    feedback = report.feedback
    parts += ["<h2>Feedback</h2>", _html_table(("arm", "positive", "negative", "neutral", "negative rate"), [
        (r.arm, r.positive, r.negative, r.neutral, _figure(r.negative_rate, "{:.1%}")) for r in feedback.arms]),
        f"<p>{feedback.unmatched} feedback record(s) name a completion id not in the log read.</p>"]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.significant{color:#b00}"
             ".moderate{color:#a60}.stable{color:#070}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>monitor {e(report.model)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _quality_html(rows) -> str:
    columns = _quality_columns(rows)
    return _html_table(("window", "arm", *(label for label, _, _ in columns)),
                       [(r.window or "all", r.arm, *(_figure(getattr(r, key), shape) for _, key, shape in columns))
                        for r in rows])


def _side_by_side(left, right) -> list[tuple]:
    rows = []
    for n in range(max(len(left), len(right))):
        a, b = (left[n] if n < len(left) else None), (right[n] if n < len(right) else None)
        rows.append((a.word if a else "", f"{a.weight:+.2f}" if a else "", b.word if b else "",
                     f"{b.weight:+.2f}" if b else ""))
    return rows


def _image(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return f"<img alt='chart' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _quality_chart(report: MonitorReport):
    """Per arm and window: server error rate, JSON validity, p95 latency, refusal rate."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 6), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True)
    rows = [r for r in report.quality if r.window is not None]
    windows = sorted({r.window for r in rows})
    for axis, (key, title) in zip(axes.flat, (("server_error_rate", "server error rate"),
                                              ("json_valid_rate", "JSON valid rate"),
                                              ("latency_p95", "latency p95 (s)"), ("refusal_rate", "refusal rate"))):
        for arm in sorted({r.arm for r in rows}):
            points = [(windows.index(r.window), getattr(r, key)) for r in rows
                      if r.arm == arm and getattr(r, key) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=arm)
        axis.set_title(title)
    _window_ticks(axes[1][0], windows)
    _window_ticks(axes[1][1], windows)
    axes[0][0].legend(fontsize="small")
    return figure


def _drift_chart(report: MonitorReport):
    """Per window: PSI of each prompt statistic against training, and the domain classifier's AUC."""
    from matplotlib.figure import Figure

    windows = report.drift.windows
    figure = Figure(figsize=(11, 3.5), layout="constrained")
    psi_axis, auc_axis = figure.subplots(1, 2)
    for feature in report.drift.features:
        points = [(n, w.psi[feature.feature]) for n, w in enumerate(windows) if feature.feature in w.psi]
        if points:
            psi_axis.plot(*zip(*points), marker="o", label=feature.feature)
    psi_axis.axhline(report.thresholds.psi, color="red", linestyle="--", linewidth=1)
    psi_axis.set_title("PSI vs training")
    psi_axis.legend(fontsize="small")
    for key, label in (("domain_auc", "vs training"), ("domain_auc_vs_first", "vs first window")):
        points = [(n, getattr(w, key)) for n, w in enumerate(windows) if getattr(w, key) is not None]
        if points:
            auc_axis.plot(*zip(*points), marker="o", label=label)
    auc_axis.axhline(report.thresholds.domain_auc, color="red", linestyle="--", linewidth=1)
    auc_axis.set_title("domain classifier AUC")
    auc_axis.legend(fontsize="small")
    for axis in (psi_axis, auc_axis):
        _window_ticks(axis, [w.start for w in windows])
    return figure


def _histograms(report: MonitorReport):
    """Training vs production share per PSI bin, one panel per prompt statistic."""
    import numpy as np
    from matplotlib.figure import Figure

    features = report.drift.features
    figure = Figure(figsize=(11, 3 * ((len(features) + 1) // 2)), layout="constrained")
    for axis, feature in zip(figure.subplots((len(features) + 1) // 2, 2, squeeze=False).flat, features):
        positions = np.arange(len(feature.train_shares))
        axis.bar(positions - 0.2, feature.train_shares, width=0.4, label="training")
        axis.bar(positions + 0.2, feature.production_shares, width=0.4, label="production")
        axis.set_xticks(positions, _bin_labels(feature.bin_edges), fontsize="x-small", rotation=45)
        axis.set_title(f"{feature.feature} (PSI {feature.psi:.2f})")
        axis.legend(fontsize="small")
    return figure


def _bin_labels(edges: list[float]) -> list[str]:
    """`≤a, ≤b, >b`; for a statistic with one training value v, `<v, =v, >v`."""
    shown = [f"{edge:g}" for edge in edges]
    if len(shown) == 2 and shown[0] == shown[1]:
        return [f"<{shown[1]}", f"={shown[1]}", f">{shown[1]}"]
    return [f"≤{edge}" for edge in shown] + [f">{shown[-1]}"]


def _window_ticks(axis, starts: list[str], most: int = 12) -> None:
    """Window starts under the x axis, thinned to at most `most` labels so they stay readable."""
    every = -(-len(starts) // most)
    shown = range(0, len(starts), every)
    axis.set_xticks(shown, [starts[n][:16].replace("T", " ") for n in shown], fontsize="x-small", rotation=45)
