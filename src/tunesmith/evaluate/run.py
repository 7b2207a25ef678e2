"""Evaluation stage entry point: the base, the run's adapter, its parent, a prompting baseline and any candidates on
the same held-out examples.

Reads the run directory, writes `<run_dir>/eval/{report.json,report.md,report.html,predictions.jsonl}` and
`manifest["evaluate"]`. Gates are checked here and reported; the CLI turns a failed gate into a non-zero exit.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path


from tunesmith.config import EvaluateConfig, RunConfig
from tunesmith.data.template import end_of_turn_token_ids, template_fingerprint, tokenize_example
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.compare import compare_models, largest_differences, lost_ground, mean_interval
from tunesmith.evaluate.contenders import (
    BASE,
    CHAMPION,
    FINE_TUNED,
    PARENT,
    PROMPT_BASELINE,
    load_contenders,
    parent_dir,
    reference_labels,
    switched_to,
)
from tunesmith.data.answers import load_custom_metrics, load_json_schema
from tunesmith.evaluate.examples import evaluation_examples
from tunesmith.evaluate.gates import check_gate_metrics, check_gates, parse_gate
from tunesmith.evaluate.general import general_check, general_questions
from tunesmith.evaluate.loss import assistant_token_loss
from tunesmith.evaluate.metrics import corpus_scores, score_samples
from tunesmith.registry.overfitting import overfitting_check
from tunesmith.evaluate.prompt_baseline import (
    check_fits_context,
    cost_per_million_requests,
    extra_prompt_tokens,
    few_shot_conversations,
    few_shot_tokenized,
    training_examples,
)
from tunesmith.evaluate.report import html_report, markdown_report
from tunesmith.generation.batch_generate import sample_batched
from tunesmith.models import load_tokenizer
from tunesmith.progress_display import LoggedProgress
from tunesmith.records import REPORT_VERSION, EvaluationReport
from tunesmith.registry.run import Run
from tunesmith.registry.run_dir import staged_dir, write_json_atomic

EVAL_DIR = "eval"


def evaluate_run(run_dir: Path, config: RunConfig, candidates: list[Path] = (), gates: list[str] = (),
                 champion: Path | None = None) -> dict:
    """Score every model, compare each with the base (paired bootstrap), check gates, and write the report.

    `champion`: a run the gates may compare with (`exact_match >= champion + 0.02`), as a promotion does. The run's
    parent (`train.init_from`) and a few-shot prompting baseline join when `evaluate` asks for them."""
    run_dir = Path(run_dir)
    run = Run.open(run_dir)
    settings = config.evaluate
    gate_rules = [parse_gate(text) for text in [*settings.gates, *gates]]
    check_settings(settings)
    check_gate_metrics(gate_rules, settings)
    parent = parent_dir(run) if settings.compare_parent and run.is_trained else None
    parent_is_champion = bool(parent and champion and parent.resolve() == Path(champion).resolve())
    _check_gate_references(gate_rules, settings, champion, parent, run_dir)
    run.verify_weights()
    tokenizer = load_tokenizer(run.weights_dir)  # the exact tokenizer and chat template used in training
    run.check_template(tokenizer, whose=f"the trained model in {run.weights_dir}")
    examples = evaluation_examples(run, settings.test_file)[: settings.max_examples]
    if not examples:
        raise TunesmithError(f"{run_dir}: the validation split is empty; raise data.validation_fraction or give data.validation")
    references = [e.reference() for e in examples]
    tokenized = [tokenize_example(tokenizer, e.message_dicts(), config.data.max_length, e.tools)
                 for e in examples]
    stop_ids = end_of_turn_token_ids(tokenizer)
    # Keyed by `Contender.few_shot`: every contender reads the plain prompts but the prompting baseline.
    prompts = {False: [e.prompt_messages() for e in examples]}
    if settings.prompt_baseline:
        prompts[True] = few_shot_conversations(training_examples(run), examples, settings.prompt_baseline,
                                               settings.prompt_baseline_selection, config.seed)
    model, contenders = load_contenders(run, tokenizer, list(candidates), settings.compare_base, champion,
                                        None if parent_is_champion else parent, bool(settings.prompt_baseline))
    token_batches = {False: tokenized}
    if settings.prompt_baseline:
        check_fits_context(tokenizer, prompts[True], settings.max_new_tokens,
                           getattr(model.config, "max_position_embeddings", None), settings.prompt_baseline)
        token_batches[True] = few_shot_tokenized(tokenizer, prompts[True], references, [e.tools for e in examples])
    harness_manager = None
    if settings.harness.tasks:
        from tunesmith.evaluate.harness import harness_task_manager

        harness_manager = harness_task_manager(settings.harness)

    results, per_example, outputs, general = {}, {}, {}, {}
    with LoggedProgress(transient=True) as progress:
        for contender in contenders:
            # The prompt baseline is the base model: its general knowledge is the base's, measured once.
            check_general = settings.general_check and not contender.few_shot
            task = progress.add_task(f"evaluate {contender.label}",
                                     total=len(examples) + len(general_questions(settings.general_questions)) * check_general)
            started = time.perf_counter()
            with switched_to(model, contender) as active:
                loss = assistant_token_loss(active, token_batches[contender.few_shot], tokenizer.pad_token_id,
                                            settings.batch_size)
                samples = sample_batched(active, tokenizer, prompts[contender.few_shot], stop_ids,
                                         settings.max_new_tokens, settings.batch_size,
                                         on_batch=lambda n, t=task: progress.advance(t, n),
                                         tools=[e.tools for e in examples], temperature=settings.temperature,
                                         samples=settings.samples, seed=config.seed)
                answers = [choices[0] for choices in samples]
                scores = {"validation_loss": loss["loss"], "perplexity": loss["perplexity"]}
                if check_general:
                    general[contender.label] = general_check(active, tokenizer, stop_ids, settings.batch_size,
                                                             on_batch=lambda n, t=task: progress.advance(t, n),
                                                             limit=settings.general_questions)
                    scores.update(general_ppl=general[contender.label]["general_ppl"],
                                  general_qa=general[contender.label]["general_qa"])
                if harness_manager is not None and not contender.few_shot:
                    from tunesmith.evaluate.harness import run_harness

                    scores.update(run_harness(active, tokenizer, settings.harness, harness_manager, settings.batch_size))
            per_example[contender.label] = score_samples(samples, references, settings)
            means = {name: sum(v) / len(v) for name, v in per_example[contender.label].items()}
            means["mean_new_tokens"] = means.pop("new_tokens")
            results[contender.label] = {**means, **corpus_scores(answers, references, settings), **scores,
                                        "seconds": time.perf_counter() - started}
            outputs[contender.label] = answers

    report = {
        "version": REPORT_VERSION, "run": run.name, "base_model": run.manifest.base_model.model_dump(),
        "examples": len(examples),
        "data_hash": run.manifest.data.dataset_hash,
        "models": {c.label: {"adapter": c.adapter_name is not None, "full_fine_tune": c.model is not None,
                             "run_dir": str(c.run_dir) if c.run_dir else None}
                   for c in contenders},
        "generation": {"do_sample": bool(settings.temperature), "temperature": settings.temperature,
                       "samples": settings.samples if settings.temperature else 1, "max_new_tokens": settings.max_new_tokens, "stop_token_ids": stop_ids,
                       "batch_size": settings.batch_size, "chat_template_sha": template_fingerprint(tokenizer)},
        "results": {label: {k: round(v, 4) for k, v in scores.items()} for label, scores in results.items()},
        "intervals": {label: {name: [round(x, 4) for x in mean_interval(values, settings.confidence,
                                                                          settings.bootstrap_samples)]
                              for name, values in scores.items() if name != "new_tokens"}
                      for label, scores in per_example.items()},
        "confidence": settings.confidence,
        "comparisons": _comparisons(per_example, general, settings),
        "overfitting": overfitting_check(run.trained.model_dump(mode="json"), settings.overfit_tolerance),
    }
    parent_label = CHAMPION if parent_is_champion else PARENT
    if parent is not None and parent_label in per_example:
        report["against_parent"] = _against_parent(parent_label, parent, per_example, general, settings)
    if PROMPT_BASELINE in per_example:
        report["against_prompting"] = _against_prompting(tokenizer, prompts, per_example, general, settings)
    if settings.judge.base_url:
        report["judge"] = _judge(settings, examples, references, outputs, per_example, report["results"])
    report["gates"] = check_gates(gate_rules, report["results"], reference_labels(results, parent_is_champion),
                                  ungated=(PROMPT_BASELINE,))
    report["passed"] = all(outcome["passed"] for outcome in report["gates"])
    EvaluationReport.model_validate(report)  # the contract later stages read; a failure here is our bug
    _write(run_dir, report, examples, references, outputs, per_example, general)
    run.record("evaluate", {"report": f"{EVAL_DIR}/report.json", "results": report["results"],
                            "gates": report["gates"], "passed": report["passed"]})
    return report


def check_settings(settings: EvaluateConfig) -> None:
    """Catch bad evaluate options before any model is loaded."""
    if settings.regex:
        try:
            re.compile(settings.regex)
        except re.error as exc:
            raise TunesmithError(f"evaluate.regex {settings.regex!r} is not a valid regular expression ({exc})") from None
    if not 0 < settings.confidence < 1:
        raise TunesmithError(f"evaluate.confidence {settings.confidence} must be between 0 and 1, such as 0.95")
    if settings.json_schema:
        load_json_schema(str(settings.json_schema))
    load_custom_metrics(tuple(settings.custom_metrics))
    if settings.judge.base_url and not settings.judge.model:
        raise TunesmithError("evaluate.judge.model is empty; name the model the judge endpoint serves")
    if settings.judge.base_url and not settings.compare_base:
        raise TunesmithError("the judge compares candidates with the base model; set evaluate.compare_base=true")


def _check_gate_references(gate_rules, settings: EvaluateConfig, champion: Path | None, parent: Path | None,
                           run_dir: Path) -> None:
    """Every model a gate compares with will be evaluated; said before any model loads."""
    references = {rule.reference for rule in gate_rules}
    if not settings.compare_base and "base" in references:
        raise TunesmithError("a gate compares with the base model, but evaluate.compare_base is false; "
                             "set it to true or use absolute thresholds such as `exact_match >= 0.8`")
    if champion is None and "champion" in references:
        raise TunesmithError("a gate compares with the champion, which only `tunesmith promote` evaluates; "
                             "use `base` or an absolute threshold here")
    if parent is None and "parent" in references:
        raise TunesmithError(f"a gate compares with the parent, but {run_dir} has none to compare with (it was not "
                             "trained with train.init_from, or evaluate.compare_parent is false); use `base` or an "
                             "absolute threshold")


def _comparisons(per_example: dict, general: dict, settings: EvaluateConfig) -> dict:
    if BASE not in per_example:
        return {}
    return {label: {"metrics": _paired(BASE, label, per_example, general, settings),
                    **largest_differences(per_example[BASE], scores, settings.show_differences)}
            for label, scores in per_example.items() if label != BASE}


def _paired(reference: str, label: str, per_example: dict, general: dict, settings: EvaluateConfig) -> dict:
    """`label` against `reference` on every task metric, and on the general questions when both answered them."""
    metrics = compare_models(per_example[reference], per_example[label], settings.confidence, settings.bootstrap_samples)
    if label in general and reference in general:
        metrics.update(compare_models({"general_qa": general[reference]["per_question"]},
                                      {"general_qa": general[label]["per_question"]},
                                      settings.confidence, settings.bootstrap_samples))
    return metrics


def _against_parent(label: str, directory: Path, per_example: dict, general: dict, settings: EvaluateConfig) -> dict:
    metrics = _paired(label, FINE_TUNED, per_example, general, settings)
    return {"label": label, "run_dir": str(directory), "name": Run.open(directory).name, "metrics": metrics,
            "lost_ground": lost_ground(metrics)}


def _against_prompting(tokenizer, prompts: dict, per_example: dict, general: dict, settings: EvaluateConfig) -> dict:
    extra = extra_prompt_tokens(tokenizer, prompts[False], prompts[True])
    return {"examples_per_prompt": settings.prompt_baseline, "selection": settings.prompt_baseline_selection,
            "metrics": _paired(PROMPT_BASELINE, FINE_TUNED, per_example, general, settings),
            "extra_prompt_tokens": round(extra, 2), "prompt_token_price": settings.prompt_token_price,
            "cost_per_million_requests": round(cost_per_million_requests(extra, settings.prompt_token_price), 4)}


def _judge(settings: EvaluateConfig, examples, references, outputs, per_example, results) -> dict:
    from tunesmith.evaluate.judge import judge_candidate

    verdicts = {}
    requests = [e.messages[-2].content for e in examples]
    base_answers = [g.text for g in outputs[BASE]]
    metric = "exact_match" if "exact_match" in per_example[BASE] else next(iter(per_example[BASE]))
    for label, answers in outputs.items():
        if label == BASE:
            continue
        deltas = [c - b for b, c in zip(per_example[BASE][metric], per_example[label][metric])]
        verdicts[label] = judge_candidate(settings.judge, requests, references, base_answers,
                                          [g.text for g in answers], deltas)
        if verdicts[label]["win_rate"] is not None:
            results[label]["judge_win_rate"] = round(verdicts[label]["win_rate"], 4)
    return verdicts


def _write(run_dir: Path, report: dict, examples, references, outputs, per_example, general) -> None:
    with staged_dir(run_dir / EVAL_DIR) as staging:
        write_json_atomic(staging / "report.json", report)
        rows = _prediction_rows(examples, references, outputs, per_example)
        (staging / "report.md").write_text(markdown_report(report, rows), encoding="utf-8")
        with (staging / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if general:
            write_json_atomic(staging / "general.json", general)
        (staging / "report.html").write_text(html_report(report, rows), encoding="utf-8")


def _prediction_rows(examples, references, outputs: dict, per_example: dict) -> list[dict]:
    rows = []
    for index, example in enumerate(examples):
        row = {"line": example.source_line, "prompt": example.messages[-2].content, "reference": references[index]}
        for label, answers in outputs.items():
            scores = per_example[label]
            row[label] = {"text": answers[index].text, "stopped": answers[index].stopped,
                          "exact_match": _shown(scores["exact_match"][index]),
                          "token_f1": round(scores["token_f1"][index], 4)}
        rows.append(row)
    return rows


def _shown(score: float) -> bool | float:
    """A greedy answer is right or wrong; with several samples per example, the share of them that was right."""
    return bool(score) if score in (0.0, 1.0) else round(score, 4)
