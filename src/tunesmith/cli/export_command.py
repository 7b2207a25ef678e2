"""`tunesmith export`: write a registered version as a merged HF folder, GGUF or an Ollama model, prove it answers
like what it was made from, then move it into place and record it with the version."""

from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.markup import escape

from tunesmith.cli.output import console
from tunesmith.errors import TunesmithError


def export_version(reference: str, fmt: str, dtype: str | None, out: Path | None, check_examples: int,
                   max_new_tokens: int) -> Path:
    """The export folder; it appears only after its check passed."""
    from tunesmith.data.template import end_of_turn_token_ids
    from tunesmith.evaluate.agreement import compare_answers
    from tunesmith.evaluate.examples import evaluation_examples
    from tunesmith.models import load_gguf_model, load_model, load_tokenizer
    from tunesmith.records import ExportRecord
    from tunesmith.registry import export as exports
    from tunesmith.registry.gguf_export import write_gguf
    from tunesmith.registry.hashing import folder_manifest
    from tunesmith.registry.run import Run
    from tunesmith.registry.run_dir import staged_dir
    from tunesmith.registry.store import Registry

    dtype = exports.check_request(fmt, dtype)
    registry = Registry()
    name, version = registry.resolve(reference)
    run = Run.open(registry.local_copy(name, version))
    target = Path(out or Path("exports") / f"{name}-v{version}-{fmt}-{dtype}")
    tokenizer = load_tokenizer(run.weights_dir)
    stop_ids = end_of_turn_token_ids(tokenizer)
    examples = evaluation_examples(run)[:check_examples]
    if not examples:
        raise TunesmithError(f"{name}@{version} has no held-out examples to check the export against")
    started = time.perf_counter()
    console.print(f"exporting {name}@{version} as {fmt} ({dtype}) -> {escape(str(target))}", highlight=False)
    with staged_dir(target) as staging:
        merged = exports.merged_model(run)
        if fmt == "merged":
            exports.save_merged(merged, tokenizer, staging, dtype, stop_ids)
            del merged
            reference_model, candidate = exports.answering_model(run), load_model(staging)
            compared_with = "base + adapter" if not run.is_full_fine_tune else "the fine-tuned model"
        else:
            gguf_name = exports.gguf_file_name(name, version, dtype)
            with tempfile.TemporaryDirectory(prefix="tunesmith-merged-") as scratch:
                exports.save_merged(merged, tokenizer, Path(scratch), "float32", stop_ids)
                written = write_gguf(Path(scratch), staging / gguf_name, dtype)
            reference_model, candidate = merged, load_gguf_model(staging / gguf_name)
            compared_with = "the merged model"
            if fmt == "ollama":
                exports.write_modelfile(tokenizer, staging, gguf_name, stop_ids, exports.data_system_prompt(run))
        console.print(f"checking {len(examples)} held-out prompts against {compared_with}", highlight=False)
        checks = compare_answers(reference_model, candidate, tokenizer, examples, stop_ids, max_new_tokens)
        checks["compared_with"] = compared_with
        if fmt != "merged":
            checks["gguf"] = {k: v for k, v in written.items() if k not in ("path",)}
        if not exports.check_passed(fmt, dtype, checks):
            raise TunesmithError(f"the {fmt} export answers differently from {compared_with} on "
                                 f"{checks['prompts'] - checks['identical_answers']} of {checks['prompts']} prompts "
                                 f"(agreement {checks['agreement']:.1%} < {exports.MIN_AGREEMENT:.0%}); nothing kept")
        files = folder_manifest(staging)
        record = ExportRecord(format=fmt, dtype=dtype, path=str(target.resolve()), files=files,
                              bytes=sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()),
                              seconds=round(time.perf_counter() - started, 1), checks=checks,
                              created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        (staging / "export.json").write_text(record.model_dump_json(indent=2), encoding="utf-8")
    _record(registry, name, version, record, target)
    _print(record, target)
    return target


def _record(registry, name: str, version: str, record, target: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{record.format}-{record.dtype}-{int(time.time())}.json"
        path.write_text(record.model_dump_json(indent=2), encoding="utf-8")
        registry.log_artifact(name, version, path, "exports")


def _print(record, target: Path) -> None:
    checks = record.checks
    console.print(f"[bold green]exported[/] {escape(str(target))}: {record.bytes / 2**20:.1f} MiB in {record.seconds} s; "
                  f"{checks['identical_answers']}/{checks['prompts']} greedy answers identical to "
                  f"{checks['compared_with']} ({checks['agreement']:.1%}), largest logit difference "
                  f"{checks['max_logit_difference']:.3g}, perplexity {checks['reference_perplexity']} -> "
                  f"{checks['perplexity']}", highlight=False)
    console.print(json.dumps({name: digest[:16] for name, digest in record.files.items()}), highlight=False,
                  markup=False)
