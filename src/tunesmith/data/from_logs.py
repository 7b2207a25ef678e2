"""Production back to training data: logged answers joined with callers' feedback on their completion id.

A corrected answer replaces the model's (`corrected`), an answer rated positive is kept as it is (`approved`),
and a negative answer with a correction becomes a preference pair (`pairs`: chosen = the correction, rejected =
the model's answer, OpenAI DPO format). Every row goes through the data stage's own row check (clean-up, PII
redaction, validation, hashes) and is deduplicated, exactly and nearly, against the rows the serving version was
trained and validated on. Every logged request read is kept or dropped with a reason, and the card says so.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.dedup import NearDuplicateIndex, connected_rows
from tunesmith.data.readers import iter_records, make_record
from tunesmith.data.rows import CheckedRow, RowSettings, check_row, init_worker
from tunesmith.errors import TunesmithError
from tunesmith.records import FeedbackRecord, RequestLogRecord
from tunesmith.registry.hashing import file_sha256
from tunesmith.registry.run_dir import write_json_atomic, write_text_atomic

USES = ("corrected", "approved", "pairs")
CARD_VERSION = 1
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
NEAR_THRESHOLD = DataConfig.model_fields["near_duplicate_threshold"].default
PERMUTATIONS = DataConfig.model_fields["minhash_permutations"].default


def parse_uses(text: str) -> tuple[str, ...]:
    """`--use corrected,approved,pairs` as a tuple; an unknown kind is one clear error."""
    uses = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [use for use in uses if use not in USES]
    if unknown or not uses:
        raise TunesmithError(f"--use {text!r}: choose one or more of {', '.join(USES)}, comma-separated "
                             "(e.g. --use corrected,approved)")
    return uses


def card_path(out: Path) -> Path:
    """The JSON card written beside a from-logs output: `new.jsonl` -> `new.card.json`."""
    return Path(out).with_suffix(".card.json")


def default_pairs_path(out: Path) -> Path:
    return Path(out).with_suffix(".pairs.jsonl")


@dataclass
class FeedbackIndex:
    """The verdict that counts per completion id (a later verdict on the same answer replaces an earlier one)."""

    latest: dict[str, FeedbackRecord] = field(default_factory=dict)
    records: int = 0
    superseded: int = 0

    @classmethod
    def of(cls, feedback: Iterable[FeedbackRecord]) -> FeedbackIndex:
        index = cls()
        for record in feedback:
            index.records += 1
            index.superseded += record.completion_id in index.latest
            index.latest[record.completion_id] = record
        return index


@dataclass
class Candidate:
    """A logged answer with usable feedback: its training row, its pair, and the row it is deduplicated as."""

    kind: str
    """`corrected` or `approved`: what the training row's answer is."""
    row: CheckedRow | None
    pair: CheckedRow | None
    dedup: CheckedRow


@dataclass
class Selection:
    candidates: list[Candidate] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    pairs_left_out: Counter = field(default_factory=Counter)
    """Pairs not made from a record that still gave a training row (e.g. the correction equals the answer)."""
    pii: Counter = field(default_factory=Counter)
    matched_ids: set[str] = field(default_factory=set)


def build_from_logs(records: list[RequestLogRecord], feedback: FeedbackIndex, out: Path, uses: tuple[str, ...],
                    against: list[Path], redact_pii: bool = True, pairs_out: Path | None = None,
                    provenance: dict | None = None) -> dict:
    """Write the training rows (and pairs) atomically and their card beside `out`; returns the card.

    `against`: data files whose rows the new ones must not duplicate (the serving version's train and validation
    splits). `provenance`: what the card records about where the records came from (log dir, window, model)."""
    init_worker(RowSettings(redact_pii=redact_pii, num_perm=PERMUTATIONS))
    selection = select_candidates(records, feedback, uses)
    kept, duplicates = drop_duplicates(selection.candidates, against)
    selection.dropped.update(duplicates)
    if not kept:
        raise TunesmithError(_nothing_kept_message(records, selection.dropped, provenance or {}))
    written = {"corrected": 0, "approved": 0, "pairs": 0}
    outputs = {}
    if {"corrected", "approved"} & set(uses):
        rows = [c.row for c in kept if c.row is not None]
        for candidate in kept:
            written[candidate.kind] += candidate.row is not None
        outputs["sft"] = _write_rows(Path(out), [row.record for row in rows])
    if "pairs" in uses:
        pairs = [openai_dpo_row(json.loads(c.pair.record)) for c in kept if c.pair is not None]
        written["pairs"] = len(pairs)
        outputs["pairs"] = _write_rows(Path(pairs_out or default_pairs_path(out)), [json.dumps(p, ensure_ascii=False)
                                                                                    for p in pairs])
    for candidate in kept:
        for row in (candidate.row, candidate.pair):
            if row is not None:
                selection.pii.update(row.pii)
    accounting = {"read": len(records), "kept": len(kept), "dropped": dict(selection.dropped)}
    if accounting["read"] != accounting["kept"] + sum(accounting["dropped"].values()):
        raise AssertionError(f"from-logs accounting does not add up: {accounting}")  # our bug, never the user's
    card = {
        "version": CARD_VERSION, **(provenance or {}), "use": list(uses),
        "accounting": accounting, "rows": written, "pairs_left_out": dict(selection.pairs_left_out),
        "feedback": {**(provenance or {}).get("feedback", {}), "records": feedback.records,
                     "superseded": feedback.superseded,
                     "unmatched": len(feedback.latest.keys() - {r.id for r in records}),
                     "by_rating": dict(Counter(feedback.latest[i].rating for i in selection.matched_ids))},
        "redaction": {"enabled": redact_pii, "redacted": dict(selection.pii)},
        "against": [str(path) for path in against],
        "served": dict(Counter(f"{r.registry_model}@{r.registry_version}" if r.registry_model else r.served
                               for r in records)),
        "outputs": outputs,
    }
    write_json_atomic(card_path(out), card)
    return card


def select_candidates(records: list[RequestLogRecord], feedback: FeedbackIndex, uses: tuple[str, ...]) -> Selection:
    """Each logged request becomes a candidate row or a drop reason, in log order."""
    selection = Selection()
    for line, record in enumerate(records, start=1):
        verdict = feedback.latest.get(record.id)
        if verdict is not None:
            selection.matched_ids.add(record.id)
        reason = _unusable(record, verdict)
        if reason:
            selection.dropped[reason] += 1
            continue
        candidate, reason = _candidate(line, record, verdict, uses, selection.pairs_left_out)
        if reason:
            selection.dropped[reason] += 1
        else:
            selection.candidates.append(candidate)
    return selection


def _unusable(record: RequestLogRecord, verdict: FeedbackRecord | None) -> str | None:
    """Why a logged request cannot become training data before its feedback is looked at, if it cannot."""
    if record.status != 200:
        return "failed"
    if record.shadow:
        return "shadow"  # the caller never saw a shadow answer, so no feedback judges it
    if record.content == "none":
        return "content_none"
    if not record.answers or prompt_messages(record) is None:
        return "no_answer"
    if verdict is None:
        return "no_feedback"
    return None


def _candidate(line: int, record: RequestLogRecord, verdict: FeedbackRecord, uses: tuple[str, ...],
               pairs_left_out: Counter) -> tuple[Candidate | None, str | None]:
    answer = record.answers[0]
    correction = (verdict.corrected or "").strip() or None
    kind = "corrected" if correction else "approved" if verdict.rating == "positive" else None
    wants_row = kind in uses
    wants_pair = "pairs" in uses and verdict.rating == "negative" and correction is not None
    if not (wants_row or wants_pair):
        if kind is None:
            return None, "negative_without_correction" if verdict.rating == "negative" else verdict.rating
        return None, "not_in_use"
    prompt = prompt_messages(record)
    target = correction or answer
    sft_form = check_row(make_record(line, {"messages": prompt + [{"role": "assistant", "content": target}]}))
    if sft_form.reason:
        return None, sft_form.reason
    pair = None
    if wants_pair:
        pair = check_row(make_record(line, {"input": {"messages": prompt},
                                            "preferred_output": [{"role": "assistant", "content": correction}],
                                            "non_preferred_output": [{"role": "assistant", "content": answer}]}))
        if pair.reason:
            if not wants_row:
                return None, pair.reason
            pairs_left_out[pair.reason] += 1
            pair = None
    return Candidate(kind, sft_form if wants_row else None, pair, sft_form), None


def prompt_messages(record: RequestLogRecord) -> list[dict] | None:
    """The request as chat turns: the logged messages (chat) or the prompt as one user turn (completions)."""
    if record.endpoint == "completions":
        return None if record.prompt is None else [{"role": "user", "content": record.prompt}]
    if not record.messages:
        return None
    return [{key: message.get(key) for key in MESSAGE_KEYS if message.get(key) is not None or key == "content"}
            for message in record.messages]


def drop_duplicates(candidates: list[Candidate], against: list[Path]) -> tuple[list[Candidate], Counter]:
    """Candidates that duplicate no row of `against` and no earlier candidate (exact, or near with MinHash LSH)."""
    index = NearDuplicateIndex(NEAR_THRESHOLD, PERMUTATIONS)
    exact_first: dict[bytes, int] = {}
    exact_of = []
    for row in _against_rows(against):
        exact_of.append(exact_first.setdefault(row.exact, index.add(row.signature)))
    known = index.rows
    for candidate in candidates:
        exact_of.append(exact_first.setdefault(candidate.dedup.exact, index.add(candidate.dedup.signature)))
    clusters = connected_rows(index.rows, index.links(), np.stack([np.arange(index.rows), exact_of], axis=1))
    training_clusters = set(clusters[:known].tolist())
    seen: set[int] = set()
    kept, dropped = [], Counter()
    for number, candidate in enumerate(candidates):
        row = known + number
        cluster, exact_twin = int(clusters[row]), exact_of[row]
        if cluster in training_clusters:
            dropped["exact_duplicate_of_training" if exact_twin < known else "near_duplicate_of_training"] += 1
        elif cluster in seen:
            dropped["exact_duplicate" if exact_twin != row else "near_duplicate"] += 1
        else:
            seen.add(cluster)
            kept.append(candidate)
    return kept, dropped


def _against_rows(paths: list[Path]):
    """The checked rows of the files to deduplicate against; rows the data stage would drop are skipped."""
    for path in paths:
        for raw in iter_records(Path(path)):
            checked = check_row(raw)
            if not checked.reason:
                yield checked


def openai_dpo_row(record: dict) -> dict:
    """A checked preference record (`messages`, `chosen`, `rejected`) in OpenAI's DPO fine-tuning format."""
    return {"input": {"messages": record["messages"]},
            "preferred_output": [{"role": "assistant", "content": record["chosen"]}],
            "non_preferred_output": [{"role": "assistant", "content": record["rejected"]}]}


def _write_rows(path: Path, lines: list[str]) -> dict:
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return {"path": str(path), "rows": len(lines), "sha256": file_sha256(path)}


def _nothing_kept_message(records: list[RequestLogRecord], dropped: Counter, provenance: dict) -> str:
    where = f"{provenance.get('model', 'the model')} in {provenance.get('log_dir', 'the request log')}"
    if not records:
        since = provenance.get("window", {}).get("since", "the start")
        return (f"no requests for {where} since {since}; widen --since, or check "
                "the model name and --log-dir")
    reasons = ", ".join(f"{count} {reason}" for reason, count in dropped.most_common())
    return (f"nothing to train on from {len(records)} requests for {where} (dropped: {reasons}); collect feedback "
            "with POST /v1/feedback, widen --since, or add kinds with --use corrected,approved,pairs")
