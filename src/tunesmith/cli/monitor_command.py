"""`tunesmith monitor NAME`: drift of production prompts from the training data, answer quality over time, feedback.

Reads the request log's files only. Exit code 0; 1 when `--fail-on drift` and input drift is significant, or
`--fail-on quality` and a quality check crossed its threshold; 2 for a user error (one line, no traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith.cli.data_commands import user_errors

FAIL_ON = ("drift", "quality")
Limit = Optional[float]
"""A threshold option: None (not given) means the default `monitor.run.Thresholds` documents."""


def monitor_command(
    name: Annotated[str, typer.Argument(help="Model name in the request log: the public name asked for, a served "
                                             "name (orders@production) or the registry model.")],
    since: Annotated[str, typer.Option(help="Requests since: 2026-11-01, 7d, 24h or 30m.")] = "7d",
    window: Annotated[str, typer.Option(help="Window for drift and quality over time: 1d, 6h, 30m.")] = "1d",
    log_dir: Annotated[Optional[Path], typer.Option(
        "--log-dir", help="Request log folder (default: TUNESMITH_HOME/requests).")] = None,
    training_data: Annotated[Optional[Path], typer.Option(
        "--training-data", help="Data the model was trained on (default: the training split of each registry "
                                "version in the log).")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="Model folder whose tokenizer counts prompt tokens (default: the registry version's base model, "
             "else whitespace words).")] = None,
    json_schema: Annotated[Optional[Path], typer.Option(
        "--json-schema", help="JSON Schema file every answer must parse as and validate against (adds "
                              "schema_valid_rate).")] = None,
    regex: Annotated[Optional[str], typer.Option(
        help="Pattern every answer must match in full, Python re syntax (adds regex_match_rate).")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML report.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON.")] = None,
    prom: Annotated[Optional[Path], typer.Option(
        "--prom", help="Write Prometheus gauges (tunesmith_monitor_*) for node_exporter's textfile "
                       "collector.")] = None,
    fail_on: Annotated[Optional[list[str]], typer.Option(
        "--fail-on", help="Exit 1 on: drift (input drift significant) or quality (a check failed). "
                          "Repeatable.")] = None,
    psi: Annotated[Limit, typer.Option("--psi-threshold", help="PSI at which a prompt feature drifts (0.25).")] = None,
    auc: Annotated[Limit, typer.Option("--auc-threshold", help="Domain classifier AUC flagging drift (0.55).")] = None,
    max_error_rate: Annotated[Limit, typer.Option(help="Highest share of 5xx answers per arm (0.05).")] = None,
    max_empty_rate: Annotated[Limit, typer.Option(help="Highest share of empty answers (0.05).")] = None,
    max_refusal_rate: Annotated[Limit, typer.Option(help="Highest share of refusals (0.10).")] = None,
    min_json_valid: Annotated[Limit, typer.Option(help="Lowest share of checked answers that are JSON (0.95).")] = None,
    min_schema_valid: Annotated[Limit, typer.Option(
        help="Lowest share of answers valid against --json-schema (0.95).")] = None,
    min_regex_match: Annotated[Limit, typer.Option(help="Lowest share of answers --regex matches (0.95).")] = None,
    max_p95_latency: Annotated[Limit, typer.Option(help="Highest p95 latency in seconds (default: unchecked).")] = None,
    max_negative_rate: Annotated[Limit, typer.Option(help="Highest share of negative feedback (0.25).")] = None,
    min_requests: Annotated[Optional[int], typer.Option(
        help="Arms with fewer requests (or ratings) are shown, not judged (20).")] = None,
    classifier_prompts: Annotated[int, typer.Option(
        help="Most prompts per side for the domain classifier (a random sample beyond).")] = 5000,
) -> None:
    """Drift between production prompts and the training data, answer quality per window and arm, feedback."""
    from tunesmith.cli.output import console, plain

    with user_errors():
        unknown = sorted(set(fail_on or ()) - set(FAIL_ON))
        if unknown:
            from tunesmith.errors import TunesmithError

            raise TunesmithError(f"--fail-on {unknown[0]}: use drift or quality")
        from tunesmith.monitor.report import print_summary, write_html, write_json, write_prometheus
        from tunesmith.monitor.run import Thresholds, monitor

        given = {"psi": psi, "domain_auc": auc, "max_server_error_rate": max_error_rate,
                 "max_empty_rate": max_empty_rate, "max_refusal_rate": max_refusal_rate,
                 "min_json_valid_rate": min_json_valid, "min_schema_valid_rate": min_schema_valid,
                 "min_regex_match_rate": min_regex_match, "max_latency_p95": max_p95_latency,
                 "max_negative_feedback_rate": max_negative_rate, "min_requests": min_requests}
        thresholds = Thresholds(**{key: value for key, value in given.items() if value is not None})
        with console.status("reading the request log and comparing it with the training data"):
            report = monitor(name, since, window, log_dir, training_data, thresholds, classifier_prompts, tokenizer,
                             json_schema=json_schema, regex=regex)
        print_summary(report, console)
        for path, write in ((json_path, write_json), (html, write_html), (prom, write_prometheus)):
            if path is not None:
                write(report, path)
                console.print(plain(f"wrote {path}", "green"))
    if ("drift" in (fail_on or ()) and report.drift_failed) or ("quality" in (fail_on or ()) and report.failed_checks):
        raise typer.Exit(1)
