"""Eval-gated promotion: the challenger and the alias's current holder (the champion) on the same held-out set,
then the alias moves only when every gate passes. Chains the registry and the evaluation stage."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from rich.markup import escape

from tunesmith.cli.output import console
from tunesmith.config import load_run_config
from tunesmith.evaluate.contenders import reference_labels
from tunesmith.evaluate.gates import check_gate_metrics, check_gates, describe_outcome, parse_gate
from tunesmith.registry.run import EVAL_REPORT, Run
from tunesmith.registry.store import CONTENT_TAG, Registry, check_alias

EVIDENCE_DIR = "promotions"


def promote_version(reference: str, alias: str, extra_gates: list[str], why: str) -> bool:
    """True when the alias now points at the version (moved, or it already did)."""
    registry = Registry()
    name, version = registry.resolve(reference)
    check_alias(alias)
    with registry.errors():
        champion = (registry.client.get_registered_model(name).aliases or {}).get(alias)
    champion = champion and str(champion)
    if champion == version:
        console.print(f"{name}@{alias} already points at version {version}", highlight=False)
        return True
    challenger_dir = registry.local_copy(name, version)
    config = load_run_config(challenger_dir)
    rules = [parse_gate(text) for text in [*config.evaluate.gates, *config.registry.promote_if, *extra_gates]]
    check_gate_metrics(rules, config.evaluate)  # before the evaluation below, which takes minutes
    if champion is None:
        skipped = [rule.text for rule in rules if rule.reference == "champion"]
        rules = [rule for rule in rules if rule.reference != "champion"]
        if skipped:
            console.print(f"no current holder of {name}@{alias}: skipping {', '.join(map(escape, skipped))}", highlight=False)
    evidence = _evidence(registry, name, version, champion, challenger_dir, config)
    results = evidence["results"]
    references = reference_labels(results)
    outcomes = [o for o in check_gates(rules, results, references) if o["model"] == "fine-tuned"]
    for outcome in outcomes:
        console.print(f"[{'green' if outcome['passed'] else 'bold red'}]{escape(describe_outcome(outcome))}[/]",
                      highlight=False)
    if not all(o["passed"] for o in outcomes):
        console.print(f"[bold red]not promoted:[/] {name}@{version} stays off {alias}", highlight=False)
        return False
    registry.move_alias(name, alias, version, "promote", why,
                        {"champion": champion, "gates": outcomes, "results": results, "examples": evidence["examples"],
                         "evidence": evidence["artifact"], "reused": evidence["reused"]})
    console.print(f"[bold green]promoted[/] {name}@{alias}: {champion or '-'} -> {version}", highlight=False)
    return True


def _evidence(registry: Registry, name: str, version: str, champion: str | None, challenger_dir: Path, config) -> dict:
    """The evaluation of challenger vs champion (and base): reused when the same pair was evaluated with the same
    settings on the same held-out data, else run now and stored with the challenger's version."""
    if champion is None and (challenger_dir / EVAL_REPORT).is_file():
        report = Run.open(challenger_dir).evaluation_report()  # nobody to beat: the registered evaluation is the evidence
        console.print(f"reusing the registered evaluation of {name}@{version}", highlight=False)
        return {"champion": None, "examples": report.examples, "data_hash": report.data_hash, "results": report.results,
                "artifact": f"run/{EVAL_REPORT}", "reused": True}
    with registry.errors():
        champion_content = champion and registry.client.get_model_version(name, champion).tags.get(CONTENT_TAG)
    settings = config.evaluate.model_dump(mode="json", exclude={"gates"})
    key = hashlib.sha256(json.dumps([champion_content, settings], sort_keys=True).encode()).hexdigest()[:16]
    artifact = f"{EVIDENCE_DIR}/{key}.json"
    stored = registry.artifact_json(name, version, artifact)
    if stored is not None:
        console.print(f"reusing the stored evaluation {artifact} of {name}@{version}", highlight=False)
        return {**stored, "artifact": artifact, "reused": True}
    from tunesmith.evaluate.run import evaluate_run

    champion_dir = registry.local_copy(name, champion) if champion else None
    with tempfile.TemporaryDirectory(prefix="tunesmith-promote-") as scratch:
        work = Path(scratch) / "challenger"
        shutil.copytree(challenger_dir, work)  # evaluation writes into the run; the verified copy stays untouched
        report = evaluate_run(work, config, champion=champion_dir)
        evidence = {"champion": champion, "champion_content": champion_content, "examples": report["examples"],
                    "data_hash": report["data_hash"], "results": report["results"],
                    "comparisons": {label: c["metrics"] for label, c in report["comparisons"].items()}}
        path = Path(scratch) / f"{key}.json"
        path.write_text(json.dumps(evidence, indent=2), encoding="utf-8")
        registry.log_artifact(name, version, path, EVIDENCE_DIR)
    return {**evidence, "artifact": artifact, "reused": False}
