"""The pre-flight check, run before training (and alone via `tunesmith data check`).

It renders a few examples through the chat template and confirms that exactly the assistant turns and their
end-of-turn token are trained; that the inference prompt is what training saw before each answer; that the
template matches the one recorded at prepare; and that no held-out or benchmark row overlaps the training data.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.data.clean import clean_text, dedup_text, map_texts
from tunesmith.data.dedup import NearDuplicateIndex, connected_rows, exact_key
from tunesmith.data.formats import RowError, convert_record
from tunesmith.data.readers import iter_records
from tunesmith.data.template import (IGNORE_INDEX, end_of_turn_token_ids, generation_prompt_ids, is_trained_turn,
                                     template_fingerprint, tokenize_example)
from tunesmith.errors import TunesmithError
from tunesmith.types import ChatExample, PreferenceExample, UnpairedPreferenceExample

RECORD_TYPES = {"sft": ChatExample, "preference": PreferenceExample, "unpaired_preference": UnpairedPreferenceExample}


def preflight_report(run_dir: Path, config, tokenizer, data_section: dict, extra_benchmarks: tuple = (),
                     from_prepare: bool = False) -> dict:
    """Every check with ok/detail; `run_dir` may be a staging folder (its data/ is read)."""
    kind = data_section.get("kind", "sft")
    checks = [_template_check(tokenizer, data_section)]
    train_file = Path(run_dir) / data_section["train_file"]
    if kind == "sft":
        checks += [_mask_check(tokenizer, example) for example in _records(train_file, kind, config.data.preflight_examples)]
    if from_prepare:  # the pipeline has just compared every held-out row with train; report what it did
        leaked = data_section["accounting"]["dropped"].get("leakage", 0)
        flagged = data_section["accounting"]["flagged"].get("leakage", 0)
        checks.append({"name": "held-out rows vs train", "ok": True, "overlaps": flagged,
                       "detail": f"{leaked} overlapping held-out row(s) removed, {flagged} flagged and kept"})
    else:
        validation = list(_records(Path(run_dir) / data_section["validation_file"], kind))
        checks.append(overlap_check(_records(train_file, kind), {"validation": validation}, config.data, "held-out rows vs train",
                                    must_be_zero=config.data.leakage == "remove"))
    benchmarks = {str(path): _benchmark_records(Path(path)) for path in [*config.data.benchmark_files, *extra_benchmarks]}
    if benchmarks:
        checks.append(overlap_check(_records(train_file, kind), benchmarks, config.data, "benchmark rows vs train", must_be_zero=True))
    return {"ok": all(c["ok"] for c in checks), "checks": checks}


def raise_on_failures(report: dict) -> None:
    failed = [c for c in report["checks"] if not c["ok"]]
    if failed:
        raise TunesmithError("pre-flight check failed: " + "; ".join(f"{c['name']}: {c['detail']}" for c in failed))


def _template_check(tokenizer, data_section: dict) -> dict:
    now, recorded = template_fingerprint(tokenizer), data_section.get("chat_template_sha")
    ok = recorded in (None, now)
    return {"name": "chat template", "ok": ok,
            "detail": f"sha {now} matches prepare" if ok else f"tokenizer template {now} != {recorded} recorded at prepare; re-run prepare"}


def _mask_check(tokenizer, example: ChatExample) -> dict:
    """Trained tokens are each assistant answer followed by an end-of-turn token, and nothing else."""
    messages = [m.as_dict() for m in example.messages]
    tokenized = tokenize_example(tokenizer, messages, max_length=10**9, tools=example.tools)
    stops = set(end_of_turn_token_ids(tokenizer))
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    trained_turns = [m for m in messages if is_trained_turn(m)]
    name = f"loss mask (train line {example.source_line})"
    if len(runs) != len(trained_turns):
        return {"name": name, "ok": False,
                "detail": f"{len(runs)} trained spans for {len(trained_turns)} assistant turns"}
    for run, turn in zip(runs, trained_turns):
        answer, text = turn["content"], tokenizer.decode(run[:-1])
        # A tool-calling turn's trained text is the template's rendering of the calls, not just its content.
        as_expected = answer.strip() in text if turn.get("tool_calls") else text.strip() == answer.strip()
        if run[-1] not in stops or not as_expected:
            return {"name": name, "ok": False, "detail": f"trained span {tokenizer.decode(run)!r} is not the answer "
                                                          f"{answer[:60]!r} followed by an end-of-turn token"}
    prompt = generation_prompt_ids(tokenizer, messages[:-1], example.tools)
    if tokenized.input_ids[: len(prompt)] != prompt:
        return {"name": name, "ok": False, "detail": "the inference prompt differs from the tokens training sees before the answer"}
    trained = sum(len(run) for run in runs)
    return {"name": name, "ok": True, "detail": f"{trained} of {len(tokenized.input_ids)} tokens trained: "
                                                f"{len(trained_turns)} answer(s), each ending in an end-of-turn token"}


def overlap_check(train, others: dict[str, list], data, name: str, must_be_zero: bool) -> dict:
    """Exact and near duplicates (MinHash LSH) between the rows of `others` and the training rows."""
    index = NearDuplicateIndex(data.near_duplicate_threshold, data.minhash_permutations)
    exact = set()
    for record in train:
        text = dedup_text(record)
        exact.add(exact_key(text))
        index.add(index.maker.signature(text))
    train_rows, candidates = index.rows, []
    for label, records in others.items():
        for record in records:
            text = dedup_text(record)
            candidates.append((label, record.source_line, exact_key(text) in exact))
            index.add(index.maker.signature(text))
    clusters = connected_rows(index.rows, index.links())
    near_train = set(clusters[:train_rows].tolist())
    found = {label: [] for label in others}
    for row, (label, line, is_exact) in enumerate(candidates, start=train_rows):
        if is_exact or clusters[row] in near_train:
            found[label].append(line)
    total = sum(len(hits) for hits in found.values())
    detail = "; ".join(f"{label}: {len(hits)} overlapping (lines {', '.join(map(str, hits[:10]))})"
                       for label, hits in found.items() if hits) or "no overlap"
    return {"name": name, "ok": total == 0 or not must_be_zero, "detail": detail, "overlaps": total}


def _records(path: Path, kind: str, limit: int | None = None):
    """Records of a run-directory split, streamed (the first `limit` only, when given)."""
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if limit is not None and line_no > limit:
                return
            record = RECORD_TYPES[kind].model_validate_json(line)
            record.source_line = line_no
            yield record


def _benchmark_records(path: Path) -> list:
    """A benchmark file's rows in any supported format, cleaned like training rows; rows that do not parse are errors."""
    records, bad = [], []
    for raw in iter_records(path):
        try:
            if raw.error:
                raise RowError(*raw.error)
            record, _ = convert_record(raw.value, None)
        except RowError as exc:
            bad.append(f"{path}:{raw.line}: {exc}")
            continue
        map_texts(record, clean_text)
        record.source_line = raw.line
        records.append(record)
    if bad:
        raise TunesmithError(f"benchmark file has {len(bad)} unreadable row(s): {bad[0]}")
    return records

