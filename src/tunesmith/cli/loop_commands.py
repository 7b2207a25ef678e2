"""`tunesmith data from-logs` and `tunesmith retrain`: the way back from production to a better model.

from-logs turns the request log and its feedback into training rows (data/from_logs.py). retrain chains the
stages: the version behind NAME@production is the parent; the child is prepared on the new rows plus a replay
share of the parent's training split, trained from the parent's adapter, evaluated with the parent beside it,
compared on the parent's old held-out rows and on the new ones, registered with that lineage, and promoted only
when it holds the old task (within a tolerance) and wins on the new one.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

COMPARED_METRICS = ("exact_match", "token_f1")
"""The metrics the evaluation keeps per example, so they can be split into old and new held-out rows."""


def from_logs_command(
    name: Annotated[str, typer.Argument(help="Model whose requests to use: the asked-for, served or registry name.")],
    since: Annotated[str, typer.Option(help="Only requests since: 2026-11-01, 7d, 24h or 30m.")] = "7d",
    log_dir: Annotated[Optional[Path], typer.Option("--log-dir", help="Request log folder (default: "
                                                                      "TUNESMITH_HOME/requests).")] = None,
    use: Annotated[str, typer.Option(help="What becomes data: corrected (corrections replace the answer), approved "
                                          "(positive answers as they are), pairs (negative + correction as DPO "
                                          "pairs).")] = "corrected,approved,pairs",
    out: Annotated[Optional[Path], typer.Option(help="Training rows to write (default: NAME-feedback.jsonl); a "
                                                     "JSON card goes beside it.")] = None,
    pairs_out: Annotated[Optional[Path], typer.Option("--pairs-out", help="Preference pairs to write (default: "
                                                                          "OUT with .pairs.jsonl).")] = None,
    no_redact: Annotated[bool, typer.Option("--no-redact", help="Keep PII (emails, phones, cards, keys) as "
                                                                "logged and corrected.")] = False,
    against: Annotated[Optional[str], typer.Option(help="Rows the new ones must not duplicate: a data file, a run "
                                                        "directory, NAME@VERSION, or none (default: the registered "
                                                        "versions that served the requests).")] = None,
) -> None:
    """Turn logged answers and their feedback into training data: corrected, approved, preference pairs."""
    from tunesmith.cli.data_commands import user_errors
    from tunesmith.cli.output import console, plain
    from tunesmith.data.from_logs import FeedbackIndex, build_from_logs, card_path, parse_uses
    from tunesmith.registry.hashing import file_sha256
    from tunesmith.request_log import (FEEDBACK_FILE, default_request_log_dir, parse_since, read_feedback,
                                       read_request_log, utc_timestamp)

    with user_errors():
        uses, log_dir = parse_uses(use), log_dir or default_request_log_dir()
        out = out or Path(f"{name}-feedback.jsonl")
        window = {"since": parse_since(since), "until": datetime.now(timezone.utc)}
        records = [r for r in read_request_log(log_dir, since=window["since"], model=name)
                   if datetime.fromisoformat(r.time) <= window["until"]]
        feedback_file = log_dir / FEEDBACK_FILE
        feedback = FeedbackIndex.of(read_feedback(log_dir, since=window["since"]))
        provenance = {"kind": "from_logs", "model": name, "log_dir": str(log_dir),
                      "window": {key: utc_timestamp(moment) for key, moment in window.items()},
                      "feedback": {"file": str(feedback_file),
                                   "sha256": file_sha256(feedback_file) if feedback_file.is_file() else None}}
        with tempfile.TemporaryDirectory(prefix="tunesmith-from-logs-") as scratch:
            against_paths = _against_files(against, records, Path(scratch))
            card = build_from_logs(records, feedback, out, uses, against_paths, not no_redact, pairs_out, provenance)
    accounting, rows = card["accounting"], card["rows"]
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(accounting["dropped"].items(), key=lambda i: -i[1]))
    console.print(plain(f"read {accounting['read']} requests of {name} since {provenance['window']['since']} = kept "
                        f"{accounting['kept']} + dropped {sum(accounting['dropped'].values())}"
                        + (f" ({dropped})" if dropped else "")))
    for kind, output in card["outputs"].items():
        what = (f"{rows['corrected']} corrected + {rows['approved']} approved rows" if kind == "sft"
                else f"{rows['pairs']} preference pairs")
        console.print(plain(f"  wrote {what} to {output['path']}"))
    if card["feedback"]["unmatched"]:
        console.print(plain(f"  {card['feedback']['unmatched']} feedback records name no request of {name} in this "
                            "window (other models, or answers older than --since)"))
    console.print(plain(f"  card {card_path(out)}"))


def _against_files(against: str | None, records: list, scratch: Path) -> list[Path]:
    """The data files whose rows the new ones must not duplicate (see `--against`)."""
    from tunesmith.errors import TunesmithError
    from tunesmith.registry.retrain import version_rows, version_run
    from tunesmith.registry.store import Registry

    if against is not None and against.strip().lower() == "none":
        return []
    if against is not None and Path(against).is_file():
        return [Path(against)]
    if against is not None and Path(against).is_dir():
        return version_rows(Path(against), scratch)
    if against is not None and (Path(against).suffix or against.startswith((".", "/", "~"))):
        raise TunesmithError(f"--against {against}: no such data file or run directory; give one, a registered "
                             "version (NAME@VERSION), or none")
    if against is not None:
        return version_rows(version_run(Registry(), against).run_dir, scratch)
    served = sorted({(r.registry_model, r.registry_version) for r in records if r.registry_model and r.registry_version})
    if not records:
        return []  # nothing to deduplicate; the data step reports the empty window
    if not served:
        raise TunesmithError("the logged requests name no registered version (served from run directories?), so "
                             "there is no training data to deduplicate against by default; pass --against with a "
                             "run directory, NAME@VERSION or data file, or --against none")
    registry, files = Registry(), []
    for number, (model, version) in enumerate(served):
        try:
            run_dir = version_run(registry, f"{model}@{version}").run_dir
        except TunesmithError as exc:
            raise TunesmithError(f"the requests were answered by {model}@{version}, whose data the new rows are "
                                 f"deduplicated against: {exc}; or pass --against with a run directory, data file "
                                 "or none") from None
        files += version_rows(run_dir, scratch / str(number))
    return files


def retrain_command(
    name: Annotated[str, typer.Argument(help="Registered model to retrain, e.g. orders.")],
    data: Annotated[Path, typer.Option("--data", help="New SFT rows, e.g. from `tunesmith data from-logs`.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Config overrides for the child, such as "
                                                                  "train.epochs=1.")] = None,
    from_: Annotated[str, typer.Option("--from", help="Alias or version of NAME to continue from.")] = "production",
    replay: Annotated[float, typer.Option(help="Share of the parent's training rows mixed in (0: none, 2: each "
                                               "twice).")] = 0.5,
    config: Annotated[Optional[Path], typer.Option(help="YAML to start from instead of the parent's own config.")] = None,
    promote_to: Annotated[Optional[str], typer.Option("--promote-to", help="Alias to move to the child when it "
                                                                           "passes the gates.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the parent, the data mix and the config changes; "
                                                            "write and train nothing.")] = False,
    held_out: Annotated[Optional[float], typer.Option("--held-out", help="Share of the new rows held out (default: "
                                                                         "data.validation_fraction).")] = None,
    metric: Annotated[str, typer.Option(help="Metric compared with the parent: exact_match or token_f1.")] = "exact_match",
    tolerance: Annotated[float, typer.Option(help="How much the child may lose on the old held-out rows.")] = 0.02,
    run_name: Annotated[Optional[str], typer.Option("--name", help="Child run name (default: "
                                                                   "NAME-retrain-<UTC time>).")] = None,
) -> None:
    """Train a child of NAME@production on new data (+ replay), compare old vs new held-out rows, register, promote."""
    from tunesmith.cli.data_commands import user_errors
    from tunesmith.config import load_config, load_run_config
    from tunesmith.errors import TunesmithError
    from tunesmith.evaluate.gates import check_config_gates
    from tunesmith.registry.retrain import plan_retrain, version_run
    from tunesmith.registry.store import Registry

    with user_errors():
        if metric not in COMPARED_METRICS:
            raise TunesmithError(f"--metric {metric!r}: choose {' or '.join(COMPARED_METRICS)} (the metrics kept per "
                                 "example, which the old and new held-out rows are scored on)")
        if tolerance < 0:
            raise TunesmithError(f"--tolerance {tolerance}: give how much the child may lose on the old held-out "
                                 "rows, 0 or more (such as 0.02)")
        registry = Registry()
        parent = version_run(registry, f"{name}@{from_}")
        start = load_config(config, overrides or []) if config else load_run_config(parent.run_dir, overrides or [])
        with tempfile.TemporaryDirectory(prefix="tunesmith-retrain-") as scratch:
            plan = plan_retrain(parent, start, data, replay, held_out or start.data.validation_fraction, run_name,
                                Path(scratch) if dry_run else None)
            if dry_run:
                _print_plan(plan, from_, promote_to, metric, tolerance)
                return
        check_config_gates(plan.config)  # a misspelled gate fails now, not after training
        comparison, report, version = _retrain(registry, plan, data, from_, metric, tolerance)
    if not comparison["passed"]:
        if promote_to:
            from tunesmith.cli.output import console

            console.print(f"[bold red]not promoted:[/] {name}@{version} stays off {promote_to}", highlight=False)
        raise typer.Exit(1)
    if promote_to:
        why = f"retrain of {plan.parent.reference} on {data}: holds the old held-out rows and wins on the new ones"
        with user_errors():
            moved = _promote(registry, plan, version, promote_to, report, comparison, why)
        if not moved:
            raise typer.Exit(1)


def _retrain(registry, plan, data: Path, from_: str, metric: str, tolerance: float) -> tuple[dict, dict, str]:
    """Prepare, train, evaluate, compare and register the child: (the comparison, its evaluation, its version)."""
    from rich.markup import escape

    from tunesmith.cli import output
    from tunesmith.data.prepare import prepare
    from tunesmith.evaluate.run import evaluate_run
    from tunesmith.registry.register import register_run
    from tunesmith.registry.retrain import write_inputs

    write_inputs(plan)
    run_dir = prepare(plan.config)
    output.prepared(run_dir)
    _check_both_held_out(run_dir, plan)
    output.trained(run_dir, _train(run_dir, plan.config))
    report = evaluate_run(run_dir, plan.config, champion=plan.parent.run_dir)
    output.evaluated(run_dir, report)
    if not report["passed"]:  # a gate of the config failed: like `tunesmith run`, nothing is registered
        raise typer.Exit(1)
    comparison = compare_held_out(run_dir, plan, metric, tolerance)
    _record_retrain(run_dir, plan, data, from_, comparison)
    info, created = register_run(registry, run_dir, plan.parent.name)
    output.console.print(f"[bold green]{'registered' if created else 'already registered as'}[/] "
                         f"{info.model}@{info.version} (parent {plan.parent.reference}, {escape(registry.uri)})",
                         highlight=False)
    return comparison, report, info.version


def _promote(registry, plan, version: str, alias: str, report: dict, comparison: dict, why: str) -> bool:
    """Move `alias` to the child behind the registry's promotion gates. When the parent holds the alias, the child's
    evaluation (the parent beside it on the child's held-out split, with the config's settings) is the evidence
    `tunesmith promote` would compute, so it is not computed twice; any other holder is evaluated by
    `promote_version`."""
    from tunesmith.cli.output import console, plain
    from tunesmith.cli.promotion import promote_version
    from tunesmith.evaluate.contenders import FINE_TUNED, reference_labels
    from tunesmith.evaluate.gates import check_gates, describe_outcome, parse_gate
    from tunesmith.registry.store import check_alias

    name, config = plan.parent.name, plan.config
    with registry.errors():
        holder = (registry.client.get_registered_model(name).aliases or {}).get(check_alias(alias))
    if holder is None or str(holder) != plan.parent.version:
        return promote_version(f"{name}@{version}", alias, [], why)
    rules = [parse_gate(text) for text in [*config.evaluate.gates, *config.registry.promote_if]]
    references = reference_labels(report["results"], parent_is_champion=True)  # the parent holds the alias
    outcomes = [o for o in check_gates(rules, report["results"], references) if o["model"] == FINE_TUNED]
    for outcome in outcomes:
        console.print(plain(describe_outcome(outcome), "green" if outcome["passed"] else "bold red"))
    if not all(outcome["passed"] for outcome in outcomes):
        console.print(f"[bold red]not promoted:[/] {name}@{version} stays off {alias}", highlight=False)
        return False
    registry.move_alias(name, alias, version, "promote", why, {
        "champion": plan.parent.version, "gates": outcomes, "results": report["results"],
        "examples": report["examples"], "evidence": "run/eval/report.json", "reused": True, "retrain": comparison})
    console.print(f"[bold green]promoted[/] {name}@{alias}: {plan.parent.version} -> {version}", highlight=False)
    return True


def _check_both_held_out(run_dir: Path, plan) -> None:
    """The comparison needs old and new held-out rows; dedup and leakage removal may have taken all new ones."""
    from tunesmith.errors import TunesmithError
    from tunesmith.registry.retrain import NEW, OLD, held_out_subsets

    found = set(held_out_subsets(run_dir, plan.parent.run_dir).values())
    for subset, what in ((OLD, "the parent's held-out rows"), (NEW, "held-out rows of the new data")):
        if subset not in found:
            raise TunesmithError(f"{run_dir}: no {what} are left in the validation split after dedup and leakage "
                                 "removal (see data/dropped.jsonl); add more new rows or raise --held-out")


def _train(run_dir: Path, config) -> dict:
    """Train the child; a SIGTERM or Ctrl-C that saved a checkpoint says how to continue."""
    import sys

    from tunesmith.train.loop import TrainingStopped
    from tunesmith.train.sft import train_sft

    try:
        return train_sft(run_dir, config)
    except TrainingStopped as stop:
        print(f"{stop}; checkpoint {stop.checkpoint}; continue with `tunesmith train {run_dir} --resume`, then "
              f"`tunesmith evaluate {run_dir}` and `tunesmith register {run_dir}`", file=sys.stderr)
        raise typer.Exit(143 if stop.signal_name == "SIGTERM" else 130) from None


def compare_held_out(run_dir: Path, plan, metric: str, tolerance: float) -> dict:
    """The child vs its parent on the old held-out rows (may lose at most `tolerance`) and the new ones (must win)."""
    from tunesmith.cli.output import console, plain
    from tunesmith.errors import TunesmithError
    from tunesmith.evaluate.compare import paired_comparison
    from tunesmith.evaluate.contenders import CHAMPION, FINE_TUNED
    from tunesmith.evaluate.gates import check_gates, describe_outcome, parse_gate
    from tunesmith.registry.retrain import NEW, OLD, held_out_scores

    settings = plan.config.evaluate
    scores = held_out_scores(run_dir, plan.parent.run_dir, metric)
    gates = {OLD: f"{metric} >= champion - {tolerance}", NEW: f"{metric} > champion"}
    comparison = {"metric": metric, "tolerance": tolerance, "parent": plan.parent.reference, "subsets": {}}
    for subset, gate in gates.items():
        by_label = scores[subset]
        if FINE_TUNED not in by_label:
            raise TunesmithError(f"no {subset} held-out rows were evaluated (evaluate.max_examples="
                                 f"{settings.max_examples}); raise it or unset it")
        results = {label: {metric: sum(values) / len(values)} for label, values in by_label.items()}
        outcome = check_gates([parse_gate(gate)], {label: results[label] for label in (FINE_TUNED, CHAMPION)},
                              {"champion": CHAMPION})[0]
        versus = paired_comparison(by_label[CHAMPION], by_label[FINE_TUNED], settings.confidence,
                                   settings.bootstrap_samples)
        comparison["subsets"][subset] = {"examples": len(by_label[FINE_TUNED]), "results": results,
                                         "vs_parent": versus, "gate": outcome}
        console.print(plain(f"{subset} held-out rows ({len(by_label[FINE_TUNED])}): {metric} {versus['candidate']:.3f} "
                            f"vs parent {versus['base']:.3f} ({versus['delta']:+.3f}, {settings.confidence:.0%} interval "
                            f"{versus['delta_low']:+.3f} to {versus['delta_high']:+.3f})"))
        console.print(plain(f"  {describe_outcome(outcome)}", "green" if outcome["passed"] else "bold red"))
    comparison["passed"] = all(s["gate"]["passed"] for s in comparison["subsets"].values())
    return comparison


def _record_retrain(run_dir: Path, plan, data: Path, from_: str, comparison: dict) -> None:
    """What the child was retrained from, in its manifest's train section (so its registered lineage carries it):
    the parent version, the new data with its from-logs window and feedback, the replay share, the comparison."""
    import json

    from tunesmith.cli.output import console, plain
    from tunesmith.data.from_logs import card_path
    from tunesmith.registry.hashing import file_sha256
    from tunesmith.registry.run import Run

    data_sha = file_sha256(data)
    card = json.loads(card_path(data).read_text(encoding="utf-8")) if card_path(data).is_file() else None
    if card and card.get("outputs", {}).get("sft", {}).get("sha256") != data_sha:
        console.print(plain(f"{card_path(data)} describes another version of {data} (edited since?); "
                            "its log window and feedback are not recorded", "yellow"))
        card = None
    run = Run.open(run_dir)
    retrain = {
        "parent": {"version": plan.parent.reference, "from": from_, "run_dir": str(plan.parent.run_dir)},
        "data": {"file": str(data), "sha256": data_sha, "train_rows": len(plan.new_train),
                 "held_out_rows": len(plan.new_held_out)},
        "replay": {"share": plan.replay, "parent_rows": plan.replay_rows,
                   "file": str(plan.replay_file) if plan.replay_file else None},
        "old_held_out_rows": len(plan.old_held_out),
        "window": card and card.get("window"),
        "feedback": card and card.get("feedback"),
        "from_logs": card and {key: card.get(key) for key in ("model", "log_dir", "use", "accounting", "rows", "served")},
        "comparison": comparison,
    }
    run.record("train", {**run.trained.model_dump(mode="json"), "retrain": retrain})


def _print_plan(plan, from_: str, promote_to: str | None, metric: str, tolerance: float) -> None:
    from tunesmith.cli.output import console, plain
    from tunesmith.registry.retrain import config_diff

    parent, config = plan.parent, plan.config
    console.print("[bold]retrain plan[/] (dry run: nothing written, nothing trained)", highlight=False)
    lines = [
        f"parent      {parent.reference} ({name_and_alias(parent, from_)}), copy in {parent.run_dir}",
        f"new data    {len(plan.new_train) + len(plan.new_held_out)} rows -> {len(plan.new_train)} train + "
        f"{len(plan.new_held_out)} held out",
        (f"replay      {plan.replay:g} x {plan.replay_rows} distinct training rows of the parent = about "
         f"{plan.expected_replay_rows} rows ({plan.replay_file})") if plan.replay_file else "replay      none",
        f"held out    {len(plan.old_held_out)} old (the parent's validation split) + {len(plan.new_held_out)} new",
        f"child       {config.run_dir} (inputs in {plan.inputs_dir})",
        "config      " + "\n              ".join(f"{key}: {before!r} -> {after!r}" for key, before, after
                                                 in config_diff(plan.start_config, config)),
        f"then        prepare, train from {parent.reference}, evaluate with the parent beside it, register as "
        f"{parent.name}" + (f", promote to {promote_to} if {metric} holds on the old held-out rows (tolerance "
                            f"{tolerance:g}) and wins on the new ones" if promote_to else ""),
    ]
    for line in lines:
        console.print(plain(f"  {line}"))


def name_and_alias(parent, from_: str) -> str:
    return f"{parent.name}@{from_}" if from_ != parent.version else f"version {parent.version}"
