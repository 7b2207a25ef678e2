"""How `tunesmith registry show` and `history` print a version and its alias moves."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Column, Table

from tunesmith.cli.output import console
from tunesmith.records import AliasMove, VersionInfo


def print_version(info: VersionInfo) -> None:
    lineage = info.lineage
    data, base, code = lineage.data, lineage.base_model, lineage.code
    rows = [
        ("version", f"{info.model}@{info.version}" + (f"  (aliases: {', '.join(info.aliases)})" if info.aliases else "")),
        ("content id", lineage.content_id), ("registered", lineage.registered_at), ("from run", lineage.run_name),
        ("dataset", f"hash {data['dataset_hash'][:16]}, {data.get('rows')}, card {data.get('card')}"),
        ("base model", f"{base['name']} ({base['source']}), weights sha256 {str(base.get('weights_sha256'))[:16]}"),
        ("method", f"{lineage.train.get('method')}, {lineage.train.get('precision')}"),
        ("trained weights", f"sha256 {lineage.weights_sha256[:16]}"),
        ("code", f"tunesmith {code.tunesmith}" + (f", git {code.git_commit[:12]}" if code.git_commit else "")
         + (" (uncommitted changes)" if code.git_dirty else "")),
        ("libraries", ", ".join(f"{k} {v}" for k, v in (lineage.environment.get("libraries") or {}).items() if v)),
        ("parent", _parent(lineage.parent)),
        ("MLflow run", f"{info.mlflow_run_id}  {info.source}"),
    ]
    table = Table(show_header=False, title=f"{info.model}@{info.version}")
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    console.print(table)
    _print_evaluation(lineage.evaluation)
    for export in info.exports:
        checks = export.checks
        console.print(f"export {export.format} {export.dtype or ''}: {escape(export.path)}, {export.bytes / 2**20:.1f} MiB, "
                      f"agreement {checks.get('agreement')}, max logit diff {checks.get('max_logit_difference')}",
                      highlight=False)


def _parent(parent: dict | None) -> str:
    if not parent:
        return "-"
    return f"run {parent.get('name')} ({parent.get('method')})" + (f", version {parent['version']}"
                                                                    if parent.get("version") else "")


def _print_evaluation(evaluation: dict | None) -> None:
    if not evaluation:
        console.print("evaluation: none recorded (evaluate the run before registering it)")
        return
    results = evaluation["results"]
    table = Table("metric", *results, "difference vs base [interval]",
                  title=f"evaluation on {evaluation['examples']} held-out examples")
    comparison = evaluation.get("comparisons", {}).get("fine-tuned", {})
    metrics = [m for m in results.get("fine-tuned", {}) if m != "seconds"]
    for metric in metrics:
        delta = comparison.get(metric)
        interval = f"{delta['delta']:+.3f} [{delta['delta_low']:+.3f}, {delta['delta_high']:+.3f}]" if delta else ""
        table.add_row(metric, *[_value(results[label].get(metric)) for label in results], interval)
    console.print(table)
    for gate in evaluation.get("gates") or []:
        console.print(f"gate {'passed' if gate['passed'] else 'FAILED'}: {escape(gate['gate'])} "
                      f"({gate['model']} {gate['value']:.4g} vs {gate['threshold']:.4g})", highlight=False)


def print_history(name: str, moves: list[AliasMove]) -> None:
    if not moves:
        console.print(f"{escape(name)} has no alias moves yet; move one with "
                      f"`tunesmith promote {escape(name)}@VERSION --to production`", highlight=False)
        return
    # Versions and aliases are never cut short on a narrow terminal; the time, reason and evidence wrap instead.
    fixed = (Column(header, no_wrap=True) for header in ("alias", "kind", "from", "to"))
    table = Table(Column("when", overflow="fold"), *fixed, Column("why", overflow="fold"),
                  Column("evidence", overflow="fold"),
                  title=f"alias history of {escape(name)}")
    for move in moves:
        gates = move.evidence.get("gates") or []
        evidence = (f"{sum(g['passed'] for g in gates)}/{len(gates)} gates passed" if gates
                    else ", ".join(f"{k}={v}" for k, v in move.evidence.items() if not isinstance(v, (dict, list))))
        table.add_row(move.when, move.alias, move.kind, move.from_version or "-", move.to_version, escape(move.why),
                      escape(evidence))
    console.print(table)


def _value(value) -> str:
    return "-" if value is None else f"{value:.4g}"
