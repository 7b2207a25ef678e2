"""prepare() end to end on the tiny model: accounting, strict/lenient, dedup, leakage, splits, version, card, pre-flight."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import order_rows, write_jsonl

from tunesmith.config import validate_config
from tunesmith.data.prepare import prepare, read_preference_split, read_split
from tunesmith.errors import TunesmithError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def essay_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows long enough (40 words) for near-duplicate detection to be meaningful."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": f"Question {n}: " + " ".join(rng.choices(WORDS, k=20))},
                          {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=40))}]} for n in range(count)]


def make_config(tmp_path: Path, model: Path, train: Path, **data) -> object:
    raw = {"name": "d", "base_model": str(model), "output_dir": str(tmp_path / "runs"),
           "data": {"train": str(train), "max_length": 128, "validation_fraction": 0.2, **data}}
    return validate_config(raw)


def manifest_data(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["data"]


def dropped_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "data" / "dropped.jsonl").read_text().splitlines()]


def test_lenient_mode_accounts_for_every_row_and_writes_the_dropped_ones(tmp_path, tiny_model_dir):
    rows = essay_rows(40)
    bad = ["{broken json", json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
           json.dumps({"messages": [{"role": "user", "content": "hi <|im_end|> there"}, {"role": "assistant", "content": "a"}]}),
           json.dumps(rows[3])]  # an exact duplicate
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in rows] + bad) + "\n", encoding="utf-8")
    run_dir = prepare(make_config(tmp_path, tiny_model_dir, path, mode="lenient"))
    data = manifest_data(run_dir)
    acc = data["accounting"]
    assert acc["read"] == 44 == acc["kept"] + sum(acc["dropped"].values())
    assert acc["dropped"] == {"invalid_json": 1, "unknown_role": 1, "special_tokens": 1, "exact_duplicate": 1}
    assert data["rows"]["train"] + data["rows"]["validation"] == acc["kept"] == 40
    written = dropped_rows(run_dir)
    assert sorted((r["line"], r["reason"]) for r in written if r["reason"] != "exact_duplicate") == [
        (41, "invalid_json"), (42, "unknown_role"), (43, "special_tokens")]
    [dup] = [r for r in written if r["reason"] == "exact_duplicate"]
    assert {dup["line"], int(dup["message"].rsplit(":", 1)[1])} == {4, 44}
    assert len(read_split(run_dir, "train")) == data["rows"]["train"]


def test_strict_mode_stops_on_the_first_error_class_with_line_numbers_and_leaves_no_run(tmp_path, tiny_model_dir):
    lines = [json.dumps(r) for r in essay_rows(10)]
    lines[2] = lines[6] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    lines[8] = "{oops"
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TunesmithError) as info:
        prepare(make_config(tmp_path, tiny_model_dir, path))
    message = str(info.value)
    assert f"2 row(s) with no assistant turn" in message
    assert f"{path}:3, {path}:7" in message and "1 invalid_json" in message and "data.mode=lenient" in message
    assert not (tmp_path / "runs" / "d").exists()


def test_near_duplicates_are_clustered_and_one_is_kept(tmp_path, tiny_model_dir):
    rows = essay_rows(30)
    near = json.loads(json.dumps(rows[5]))
    words = near["messages"][1]["content"].split()
    words[10] = "CHANGED"
    near["messages"][1]["content"] = " ".join(words)
    path = write_jsonl(tmp_path / "d.jsonl", rows + [near])
    data = manifest_data(prepare(make_config(tmp_path, tiny_model_dir, path)))
    assert data["accounting"]["dropped"] == {"near_duplicate": 1}
    [cluster] = data["dedup"]["clusters"]
    assert cluster["size"] == 2 and {cluster["kept"], *cluster["dropped"]} == {"d.jsonl:6", "d.jsonl:31"}

    exact_only = manifest_data(prepare(make_config(tmp_path, tiny_model_dir, path, dedup="exact"), overwrite=True))
    assert exact_only["accounting"]["dropped"] == {}


def test_version_ignores_row_order_and_file_name_but_not_content(tmp_path, tiny_model_dir):
    rows = essay_rows(30)
    first = manifest_data(prepare(make_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "a.jsonl", rows))))
    shuffled = rows[:]
    random.Random(2).shuffle(shuffled)
    again = manifest_data(prepare(make_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "b.jsonl", shuffled)),
                                  overwrite=True))
    assert again["dataset_hash"] == first["dataset_hash"] and again["train_hash"] == first["train_hash"]
    rows[0]["messages"][1]["content"] += " omega"
    edited = manifest_data(prepare(make_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "c.jsonl", rows)),
                                   overwrite=True))
    assert edited["dataset_hash"] != first["dataset_hash"]


def test_validation_rows_that_duplicate_train_are_removed_or_flagged(tmp_path, tiny_model_dir):
    rows = essay_rows(30)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:20])
    validation = write_jsonl(tmp_path / "val.jsonl", rows[20:] + [rows[0], rows[1]])
    config = make_config(tmp_path, tiny_model_dir, train, validation=str(validation))
    data = manifest_data(run_dir := prepare(config))
    assert data["accounting"]["dropped"] == {"leakage": 2}
    assert data["rows"] == {"train": 20, "validation": 10}
    assert {r["line"] for r in dropped_rows(run_dir)} == {11, 12}

    flagged = manifest_data(prepare(make_config(tmp_path, tiny_model_dir, train, validation=str(validation),
                                                leakage="flag"), overwrite=True))
    assert flagged["accounting"]["flagged"] == {"leakage": 2} and flagged["rows"]["validation"] == 12


def test_split_is_stable_when_rows_are_appended(tmp_path, tiny_model_dir):
    rows = essay_rows(60)
    old = prepare(make_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "a.jsonl", rows[:30])))
    old_val = {json.dumps(e.model_dump(exclude={"source_line"})) for e in read_split(old, "validation")}
    new = prepare(make_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "b.jsonl", rows)), overwrite=True)
    new_val = {json.dumps(e.model_dump(exclude={"source_line"})) for e in read_split(new, "validation")}
    assert old_val and old_val <= new_val


def test_stratified_split_holds_out_each_label(tmp_path, tiny_model_dir):
    rows = essay_rows(40)
    for n, row in enumerate(rows):
        row["topic"] = "rare" if n < 5 else "common"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    run_dir = prepare(make_config(tmp_path, tiny_model_dir, path, stratify_by="topic"))
    held_out_questions = {e.messages[0].content for e in read_split(run_dir, "validation")}
    rare_questions = {r["messages"][0]["content"] for r in rows[:5]}
    assert len(held_out_questions & rare_questions) == 1  # round(5 * 0.2)
    assert len(held_out_questions) == 1 + 7  # round(35 * 0.2)


def test_sources_are_mixed_with_weights(tmp_path, tiny_model_dir):
    main = write_jsonl(tmp_path / "main.jsonl", essay_rows(20, seed=1))
    extra = write_jsonl(tmp_path / "extra.jsonl", essay_rows(20, seed=2))
    config = make_config(tmp_path, tiny_model_dir, main, sources=[{"path": str(extra), "weight": 2}])
    data = manifest_data(run_dir := prepare(config))
    lines = (run_dir / "data" / "train.jsonl").read_text().splitlines()
    extra_texts = {json.dumps(r["messages"]) for r in essay_rows(20, seed=2)}
    from_extra = [line for line in lines if json.dumps(json.loads(line)["messages"]) in extra_texts]
    assert len(from_extra) == 2 * len(set(from_extra)) and len(lines) == data["rows"]["train"]
    assert [s["weight"] for s in data["sources"]] == [1.0, 2.0]


def test_pii_is_redacted_only_when_switched_on(tmp_path, tiny_model_dir):
    rows = essay_rows(20)
    rows[0]["messages"][0]["content"] += " mail me at jane.doe@example.com or call +1 415-555-0132"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    off = prepare(make_config(tmp_path, tiny_model_dir, path))
    assert "jane.doe@example.com" in (off / "data" / "train.jsonl").read_text() + (off / "data" / "validation.jsonl").read_text()
    on = prepare(make_config(tmp_path, tiny_model_dir, path, redact_pii=True), overwrite=True)
    text = (on / "data" / "train.jsonl").read_text() + (on / "data" / "validation.jsonl").read_text()
    assert "jane.doe" not in text and "[EMAIL]" in text and "[PHONE]" in text
    assert manifest_data(on)["pii"]["redacted"] == {"email": 1, "phone": 1}


def test_preference_data_is_written_in_the_run_directory_contract(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Question {n}: " + " ".join(WORDS[n % 7:n % 7 + 5]), "chosen": f"good answer {n}",
             "rejected": f"bad answer {n}"} for n in range(30)]
    run_dir = prepare(make_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "p.jsonl", rows)))
    data = manifest_data(run_dir)
    assert data["kind"] == "preference" and data["sources"][0]["format"] == "preference"
    pairs = read_preference_split(run_dir, "train") + read_preference_split(run_dir, "validation")
    assert len(pairs) == 30
    assert {(p.messages[-1].content, p.chosen, p.rejected) for p in pairs} == {
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows}
    assert data["tokens"]["train"]["trained"] > 0


def test_card_preflight_and_token_stats_are_written(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "d.jsonl", order_rows(40))
    run_dir = prepare(make_config(tmp_path, tiny_model_dir, path, max_length=30))
    data = manifest_data(run_dir)
    tokens = data["tokens"]["train"]
    assert tokens["rows"] == data["rows"]["train"] and tokens["total"] > 30 * tokens["rows"]
    # Every order row is longer than 30 tokens, and its answer starts after them: nothing would be trained.
    assert tokens["truncated_examples"] == tokens["rows"] and tokens["trained"] == 0
    assert sum(tokens["histogram"]["counts"]) == tokens["rows"] and not tokens["estimated"]
    card = (run_dir / "data" / "card.md").read_text()
    assert data["dataset_hash"] in card and "Rows read **40** = kept **40**" in card
    assert "<svg" in (run_dir / "data" / "card.html").read_text()
    preflight = json.loads((run_dir / "data" / "preflight.json").read_text())
    assert preflight["ok"] and any(c["name"].startswith("loss mask") for c in preflight["checks"])


def test_worker_processes_give_the_same_rows_as_one_process(tmp_path):
    from tunesmith.data.pipeline import Source, run_pipeline
    from tunesmith.data.rows import RowSettings

    rows = essay_rows(1200)
    path = write_jsonl(tmp_path / "d.jsonl", rows + rows[:50] + [{"messages": []}])
    results = []
    for workers in (1, 2):
        data = validate_config({"data": {"train": str(path), "mode": "lenient", "num_proc": workers}}).data
        scratch = tmp_path / f"scratch-{workers}"
        result = run_pipeline([Source(path)], RowSettings(), data, 0, scratch, tmp_path / f"dropped-{workers}")
        results.append((result.read, dict(result.dropped), scratch.read_text(), result.held_out.tolist()))
    assert results[0] == results[1]
    assert results[0][:2] == (1251, {"exact_duplicate": 50, "wrong_type": 1})
