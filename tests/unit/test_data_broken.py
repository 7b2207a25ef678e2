"""Bad input: every broken file gives one clear message or a clean drop with a reason; never a traceback or half a run.

The corpus lives in tests/data/broken/; large and binary inputs are generated here at run time. Property tests
(hypothesis) throw random JSON and random bytes at the row checker and the whole pipeline.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.config import validate_config
from tunesmith.data.pipeline import Source, run_pipeline
from tunesmith.data.prepare import prepare
from tunesmith.data.readers import parse_jsonl_line
from tunesmith.data.rows import RowSettings, check_row, init_worker
from tunesmith.errors import TunesmithError

BROKEN = Path(__file__).parent.parent / "data" / "broken"
GOOD_ROWS = [{"prompt": f"Good question number {n}?", "completion": f"Good answer {n}."} for n in range(12)]


def generated(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    if name == "binary_garbage.jsonl":
        path.write_bytes(random.Random(0).randbytes(64 * 1024))
    elif name == "huge_line.jsonl":  # a 50 MB single line among good rows
        huge = b'{"prompt": "' + b"a" * 50_000_000 + b'", "completion": "b"}\n'
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD_ROWS) + huge)
    elif name == "deeply_nested.jsonl":
        path.write_text(json.dumps(GOOD_ROWS[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    return path


CORPUS = sorted(p.name for p in BROKEN.iterdir()) + ["binary_garbage.jsonl", "huge_line.jsonl", "deeply_nested.jsonl"]


def prepare_file(tmp_path: Path, model: Path, path: Path, mode: str) -> tuple[Path | None, str]:
    """Run prepare; returns (run_dir, "") on success or (None, message) on a TunesmithError. Any other error fails."""
    config = validate_config({"name": "broken", "base_model": str(model), "output_dir": str(tmp_path / "runs"),
                              "data": {"train": str(path), "mode": mode, "validation_fraction": 0.3}})
    try:
        return prepare(config, overwrite=True), ""
    except TunesmithError as exc:
        assert not (tmp_path / "runs" / "broken").exists(), "a failed prepare left a run directory behind"
        assert not [p for p in (tmp_path / "runs").glob(".*")], "a failed prepare left a staging folder behind"
        return None, str(exc)


@pytest.mark.parametrize("name", CORPUS)
def test_every_broken_input_gives_a_clear_message_or_a_reasoned_drop(tmp_path, tiny_model_dir, name):
    source = BROKEN / name
    path = shutil.copy(source, tmp_path / name) if source.exists() else generated(tmp_path, name)
    for mode in ("strict", "lenient"):
        run_dir, message = prepare_file(tmp_path, tiny_model_dir, Path(path), mode)
        if run_dir is None:
            assert name in message and "\n" not in message.split(":")[0], message
            continue
        data = json.loads((run_dir / "manifest.json").read_text())["data"]
        acc = data["accounting"]
        assert acc["read"] == acc["kept"] + sum(acc["dropped"].values())
        dropped = [json.loads(line) for line in (run_dir / "data" / "dropped.jsonl").read_text().splitlines()]
        assert len(dropped) == sum(acc["dropped"].values()) and all(d["reason"] and d["line"] for d in dropped)


def test_huge_line_is_dropped_as_too_large_in_lenient_mode(tmp_path, tiny_model_dir):
    run_dir, _ = prepare_file(tmp_path, tiny_model_dir, generated(tmp_path, "huge_line.jsonl"), "lenient")
    [dropped] = [json.loads(line) for line in (run_dir / "data" / "dropped.jsonl").read_text().splitlines()]
    assert (dropped["line"], dropped["reason"]) == (13, "row_too_large") and len(dropped["row"]) < 1000


def test_bom_and_crlf_rows_are_read_cleanly(tmp_path):
    init_worker(RowSettings())
    lines = (BROKEN / "bom_crlf.jsonl").read_bytes().splitlines(keepends=True)
    rows = [check_row(parse_jsonl_line(n, raw)) for n, raw in enumerate(lines, start=1)]
    assert [r.reason for r in rows] == [None, None]
    assert "\r" not in rows[0].record and json.loads(rows[0].record)["messages"][0]["content"] == "Windows line one"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["messages", "role", "content", "prompt", "completion", "chosen", "rejected",
                                         "label", "instruction", "output", "conversations", "from", "value", "x"]),
                        inner, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(value=JSON)
def test_any_json_value_is_either_a_row_or_a_reasoned_drop(value):
    init_worker(RowSettings(special_tokens=("<|im_end|>",)))
    row = check_row(parse_jsonl_line(1, json.dumps(value).encode()))
    assert (row.reason is None) == bool(row.record)
    if row.reason:
        assert row.message and row.reason.islower()


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_are_either_a_row_or_a_reasoned_drop(raw):
    init_worker(RowSettings())
    row = check_row(parse_jsonl_line(1, raw))
    assert row.reason or row.record


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(st.sampled_from(["{", "[]", '{"messages": []}', '{"prompt": 1, "completion": "x"}', "\x00"]),
                    max_size=6), copies=st.integers(0, 3), order=st.randoms())
def test_rows_read_always_equal_rows_kept_plus_rows_dropped(tmp_path, bad, copies, order):
    lines = [json.dumps(r) for r in GOOD_ROWS[:6]] + bad + [json.dumps(GOOD_ROWS[0])] * copies
    order.shuffle(lines)
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = validate_config({"data": {"train": str(path), "mode": "lenient"}}).data
    result = run_pipeline([Source(path)], RowSettings(), data, 0, tmp_path / "scratch", tmp_path / "dropped.jsonl")
    assert result.read == len(lines) == result.kept + sum(result.dropped.values())
    assert result.kept == 6 and result.dropped.get("exact_duplicate", 0) == copies


def test_an_interrupted_prepare_leaves_nothing_behind(tmp_path, tiny_model_dir, monkeypatch):
    import tunesmith.data.prepare as prepare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_splits", interrupted)
    path = write_jsonl(tmp_path / "d.jsonl", GOOD_ROWS)
    config = validate_config({"name": "cut", "base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "runs"),
                              "data": {"train": str(path), "validation_fraction": 0.3}})
    with pytest.raises(KeyboardInterrupt):
        prepare(config)
    assert list((tmp_path / "runs").iterdir()) == []
