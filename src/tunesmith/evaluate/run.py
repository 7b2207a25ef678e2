"""Evaluation stage entry point: base vs fine-tuned on the same held-out examples, written as a report."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from rich.progress import Progress

from tunesmith.config import RunConfig
from tunesmith.data.prepare import read_split
from tunesmith.data.template import end_of_turn_token_ids, template_fingerprint, tokenize_example
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.generate import generate_batched
from tunesmith.evaluate.loss import assistant_token_loss
from tunesmith.evaluate.metrics import is_exact_match, score_generations
from tunesmith.evaluate.report import markdown_report
from tunesmith.models import load_tokenizer, load_with_adapter
from tunesmith.registry.run_dir import read_manifest, staged_dir, update_manifest, write_json_atomic

EVAL_DIR = "eval"


def evaluate_run(run_dir: Path, config: RunConfig) -> dict:
    """Score the base model and the run's adapter; write `<run_dir>/eval/{report.md,report.json,predictions.jsonl}`."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if "train" not in manifest:
        raise TunesmithError(f"{run_dir} has no trained adapter yet; run `tunesmith train {run_dir}` first")
    adapter_dir = run_dir / manifest["train"]["adapter_dir"]
    tokenizer = load_tokenizer(adapter_dir)  # the exact tokenizer and chat template used in training
    if template_fingerprint(tokenizer) != manifest["data"]["chat_template_sha"]:
        raise TunesmithError(f"{adapter_dir}: chat template differs from the one the data was prepared with")
    settings = config.evaluate
    examples = read_split(run_dir, "validation")[: settings.max_examples]
    prompts = [e.prompt_messages() for e in examples]
    references = [e.reference() for e in examples]
    tokenized = [tokenize_example(tokenizer, [m.model_dump() for m in e.messages], config.data.max_length)
                 for e in examples]
    stop_ids = end_of_turn_token_ids(tokenizer)
    model = load_with_adapter(manifest["base_model"]["source"], adapter_dir)

    contenders = [("fine-tuned", nullcontext)]
    if settings.compare_base:
        contenders.insert(0, ("base", model.disable_adapter))
    results, generations = {}, {}
    with Progress(transient=True) as progress:
        for label, adapter_state in contenders:
            task = progress.add_task(f"evaluate {label}", total=len(prompts))
            started = time.perf_counter()
            with adapter_state():
                loss = assistant_token_loss(model, tokenized, tokenizer.pad_token_id, settings.batch_size)
                outputs = generate_batched(model, tokenizer, prompts, stop_ids, settings.max_new_tokens,
                                           settings.batch_size, on_batch=lambda n, t=task: progress.advance(t, n))
            scores = score_generations(outputs, references, settings.json_output)
            scores.update(validation_loss=loss["loss"], perplexity=loss["perplexity"],
                          seconds=time.perf_counter() - started)
            results[label], generations[label] = scores, outputs

    report = {
        "run": manifest["name"], "base_model": manifest["base_model"], "examples": len(examples),
        "data_hash": manifest["data"]["dataset_hash"],
        "generation": {"do_sample": False, "max_new_tokens": settings.max_new_tokens, "stop_token_ids": stop_ids,
                       "batch_size": settings.batch_size, "chat_template_sha": template_fingerprint(tokenizer)},
        "results": {label: {k: round(v, 4) for k, v in scores.items()} for label, scores in results.items()},
    }
    with staged_dir(run_dir / EVAL_DIR) as staging:
        write_json_atomic(staging / "report.json", report)
        (staging / "report.md").write_text(markdown_report(report), encoding="utf-8")
        _write_predictions(staging / "predictions.jsonl", examples, references, generations, settings.json_output)
    update_manifest(run_dir, "evaluate", {"report": f"{EVAL_DIR}/report.json", "results": report["results"]})
    return report


def _write_predictions(path: Path, examples, references, generations: dict, json_output: bool) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for index, example in enumerate(examples):
            row = {"line": example.source_line, "prompt": example.messages[-2].content, "reference": references[index]}
            for label, outputs in generations.items():
                out = outputs[index]
                row[label] = {"text": out.text, "stopped": out.stopped,
                              "exact_match": is_exact_match(out.text, references[index], json_output)}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
