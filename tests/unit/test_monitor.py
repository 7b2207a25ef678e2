"""`tunesmith monitor`: input drift (PSI, KS, domain classifier) per period and window, quality per window and arm,
feedback joined on completion ids, the HTML/JSON/Prometheus outputs, --fail-on exit codes, and bad inputs."""

from __future__ import annotations

import base64
import json
import random
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from tunesmith.cli.monitor_command import monitor_command
from tunesmith.errors import TunesmithError
from tunesmith.monitor.run import MonitorReport, Thresholds, monitor
from tunesmith.records import FeedbackRecord, RequestLogRecord
from tunesmith.request_log import append_feedback, utc_timestamp

from conftest import write_jsonl

NOW = datetime.now(timezone.utc)
DAY_ONE = NOW.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=6)  # six whole days ago
COLORS, ITEMS, CITIES = ["red", "blue", "green"], ["mug", "lamp", "hat", "vase"], ["Denver", "Lisbon", "Osaka", "Oslo"]
NEW_ITEMS = ["graphics card", "gaming laptop", "4k monitor"]


def usual_prompt(rng: random.Random) -> str:
    opening = rng.choice(["", "Hello, ", "Hi! ", "Good morning. "])
    closing = rng.choice(["", " Thanks.", " As soon as you can, please.", " It is a gift."])
    return f"{opening}Please send {rng.randint(1, 9)} {rng.choice(COLORS)} {rng.choice(ITEMS)}s to " \
           f"{rng.choice(CITIES)}.{closing}"


def shifted_prompt(rng: random.Random) -> str:
    return (f"yo need {rng.randint(1, 3)}x {rng.choice(NEW_ITEMS)} with extended warranty and express delivery to "
            f"{rng.choice(CITIES)}, bill it to the company account #{rng.randint(100, 999)} asap")


def order_answer(rng: random.Random) -> str:
    return json.dumps({"item": rng.choice(ITEMS), "quantity": rng.randint(1, 9)})


def training_file(folder: Path, rows: int = 300) -> Path:
    rng = random.Random(1)
    return write_jsonl(folder / "train.jsonl", [{"messages": [
        {"role": "user", "content": usual_prompt(rng)}, {"role": "assistant", "content": order_answer(rng)}]}
        for _ in range(rows)])


def chat_record(number: int, when: datetime, prompt: str, **fields) -> RequestLogRecord:
    values = {"id": f"chatcmpl-{number}", "time": utc_timestamp(when), "endpoint": "chat", "model": "orders",
              "served": "orders@production", "messages": [{"role": "system", "content": "Extract the order."},
                                                          {"role": "user", "content": prompt}],
              "answers": ['{"item": "mug", "quantity": 2}'], "prompt_tokens": 20, "completion_tokens": 9,
              "latency_s": 0.5, "ttft_s": 0.1, "finish_reason": "stop", "status": 200}
    return RequestLogRecord(**{**values, **fields})


def write_log(folder: Path, records) -> Path:
    """Records as the request log writer lays them out (one JSON object a line), without its fsync per line."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "requests.jsonl").open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.model_dump(mode="json"), separators=(",", ":")) + "\n")
    return folder


def traffic(folder: Path, shift_from_day: int | None, days: int = 6, per_day: int = 100, **fields) -> Path:
    """`per_day` requests a day for `days` days; from `shift_from_day` on, 80% of prompts are the new kind."""
    rng = random.Random(2)
    records = []
    for day in range(days):
        for n in range(per_day):
            shifted = shift_from_day is not None and day >= shift_from_day and rng.random() < 0.8
            prompt = shifted_prompt(rng) if shifted else usual_prompt(rng)
            when = DAY_ONE + timedelta(days=day, seconds=(n + 0.5) * 86400 / per_day)
            records.append(chat_record(day * per_day + n, when, prompt, **fields))
    return write_log(folder, records)


def invoke(args: list[str]):
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command()(monitor_command)
    return CliRunner(env={"COLUMNS": "250"}).invoke(app, args)


def test_a_shift_in_the_later_days_is_flagged_with_its_figures_its_prompts_and_when_it_started(tmp_path):
    log = traffic(tmp_path / "log", shift_from_day=3)
    report = monitor("orders", "7d", "1d", log, training_file(tmp_path))

    drift = report.drift
    assert drift.verdict == "significant" and report.drift_failed
    assert drift.domain.auc > 0.65 and drift.domain.drifted  # 40% of production is the new kind
    drifted = {f.feature: f for f in drift.features if f.drifted}
    assert "prompt_chars" in drifted and drifted["prompt_chars"].psi > 0.25 and drifted["prompt_chars"].ks_pvalue < 0.05
    assert drift.summary.startswith("input drift: significant (PSI ") and f"AUC {drift.domain.auc:.2f}" in drift.summary
    assert all(p.text.startswith("yo need") for p in drift.domain.top_prompts) and len(drift.domain.top_prompts) == 5
    assert {"warranty", "express"} <= {w.word for w in drift.domain.production_words}
    by_start = {w.start: w for w in drift.windows}
    shift_start = utc_timestamp(DAY_ONE + timedelta(days=3)).replace(".000Z", "Z")
    assert drift.drift_starts == shift_start
    assert [w.verdict for w in drift.windows][:3] == ["stable"] * 3
    assert by_start[shift_start].domain_auc > 0.8 and drift.windows[1].domain_auc < 0.6
    assert by_start[shift_start].psi_vs_first["prompt_chars"] > 0.25


def test_unshifted_traffic_is_not_flagged(tmp_path):
    report = monitor("orders", "7d", "1d", traffic(tmp_path / "log", shift_from_day=None), training_file(tmp_path))

    assert report.drift.verdict != "significant" and not report.drift_failed
    assert 0.4 < report.drift.domain.auc < 0.55
    assert not any(f.drifted for f in report.drift.features)
    assert report.drift.drift_starts is None and all(w.verdict != "significant" for w in report.drift.windows)


def test_quality_per_window_and_arm_from_hand_made_records(tmp_path):
    day, later = DAY_ONE + timedelta(hours=1), DAY_ONE + timedelta(days=1, hours=1)
    production = [  # window 1: two good answers, one not JSON, one refusal, one empty, a 500 and a 429
        chat_record(1, day, "a", latency_s=0.1), chat_record(2, day, "b", latency_s=0.2),
        chat_record(3, day, "c", answers=["sure, a mug"], latency_s=0.3, ttft_s=None),
        chat_record(4, day, "d", answers=["I'm sorry, but I can't help with that."], latency_s=0.4),
        chat_record(5, day, "e", answers=[""], latency_s=1.0, finish_reason="length"),
        chat_record(6, day, "f", answers=[], status=500, error="engine failed", latency_s=9.0),
        chat_record(7, day, "g", answers=[], status=429, error="slow down", latency_s=0.01),
        chat_record(8, later, "h", latency_s=2.0)]
    candidate = [chat_record(9, day, "i", served="orders@candidate", json_valid=False, answers=['{"item": "x"}']),
                 chat_record(10, day, "j", served="orders@candidate", shadow=True)]
    report = monitor("orders", "7d", "1d", write_log(tmp_path / "log", production + candidate), training_file(tmp_path))

    rows = {(r.window, r.arm): r for r in report.quality}
    first = rows[utc_timestamp(DAY_ONE).replace(".000Z", "Z"), "orders@production"]
    assert first.requests == 7
    assert first.server_error_rate == round(1 / 7, 4) and first.client_error_rate == round(1 / 7, 4)
    assert first.json_checked == 5 and first.json_valid_rate == 0.4  # parsed: the training answers are JSON
    assert first.empty_rate == 0.2 and first.refusal_rate == 0.2 and first.stop_rate == 0.8
    assert first.latency_p95 == round(float(np.percentile([0.1, 0.2, 0.3, 0.4, 1.0], 95)), 4)
    assert first.latency_p50 == 0.3 and first.ttft_p50 == 0.1
    overall = rows[None, "orders@production"]
    assert overall.requests == 8 and overall.latency_p50 == 0.35
    logged = rows[None, "orders@candidate"]
    assert logged.json_checked == 1 and logged.json_valid_rate == 0.0  # the logged verdict wins over parsing
    assert rows[None, "orders@candidate (shadow)"].requests == 1
    assert report.drift.verdict == "unknown" and "needs 20 prompts" in report.drift.summary


def test_feedback_is_joined_on_completion_ids_and_unknown_ids_are_counted_not_fatal(tmp_path):
    log = write_log(tmp_path / "log", [chat_record(1, NOW - timedelta(hours=2), "a"),
                                       chat_record(2, NOW - timedelta(hours=2), "b", served="orders@candidate"),
                                       chat_record(3, NOW - timedelta(hours=2), "c", model="support",
                                                   served="support@production")])
    for number, (completion, rating) in enumerate([("chatcmpl-1", "negative"), ("chatcmpl-1", "positive"),
                                                   ("chatcmpl-2", "negative"), ("chatcmpl-3", "negative"),
                                                   ("chatcmpl-gone", "negative")]):
        append_feedback(log, FeedbackRecord(id=f"fb-{number}", time=utc_timestamp(NOW - timedelta(hours=1)),
                                            completion_id=completion, rating=rating))
    report = monitor("orders", "7d", "1d", log, training_file(tmp_path), thresholds=Thresholds(min_requests=1))

    arms = {row.arm: row for row in report.feedback.arms}
    assert (arms["orders@production"].negative, arms["orders@production"].positive) == (1, 1)
    assert arms["orders@production"].negative_rate == 0.5 and arms["orders@candidate"].negative_rate == 1.0
    assert report.feedback.unmatched == 1 and report.feedback.other_models == 1
    assert {(c.check, c.arm) for c in report.failed_checks} == {("negative_feedback_rate", "orders@production"),
                                                                 ("negative_feedback_rate", "orders@candidate")}


def test_the_html_json_and_prometheus_files_are_written_and_parse(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    log = traffic(tmp_path / "log", shift_from_day=3)
    append_feedback(log, FeedbackRecord(id="fb-1", time=utc_timestamp(NOW), completion_id="chatcmpl-5",
                                        rating="negative"))
    html, report_json, prom = tmp_path / "out" / "r.html", tmp_path / "r.json", tmp_path / "r.prom"
    result = invoke(["orders", "--log-dir", str(log), "--training-data", str(training_file(tmp_path)),
                     "--html", str(html), "--json", str(report_json), "--prom", str(prom)])

    assert result.exit_code == 0, result.output
    assert "input drift: significant (PSI" in result.output and "yo need" in result.output
    report = MonitorReport.model_validate_json(report_json.read_text())
    assert report.version == 1 and report.requests == 600 and report.drift.verdict == "significant"
    page = html.read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 3 and all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert "yo need" in page and "<script" not in page
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(prom.read_text()) for s in family.samples}
    assert samples["tunesmith_monitor_domain_auc", (("model", "orders"),)] == report.drift.domain.auc
    assert samples["tunesmith_monitor_psi", (("feature", "prompt_chars"), ("model", "orders"))] > 0.25
    assert samples["tunesmith_monitor_error_rate", (("model", "orders"), ("served", "orders@production"))] == 0
    assert samples["tunesmith_monitor_negative_feedback_rate",
                   (("model", "orders"), ("served", "orders@production"))] == 1.0
    assert samples["tunesmith_monitor_input_drift", (("model", "orders"),)] == 2


@pytest.mark.parametrize("shift, extra, code", [
    (3, ["--fail-on", "drift"], 1),
    (None, ["--fail-on", "drift"], 0),
    (3, [], 0),
    (None, ["--fail-on", "quality"], 1),  # every answer failed with a 500
    (None, ["--fail-on", "quality", "--max-error-rate", "1"], 0),
])
def test_fail_on_sets_the_exit_code(tmp_path, shift, extra, code):
    fields = {"status": 500, "answers": [], "error": "engine failed"} if "quality" in extra else {}
    log = traffic(tmp_path / "log", shift_from_day=shift, **fields)
    result = invoke(["orders", "--log-dir", str(log), "--training-data", str(training_file(tmp_path)), *extra])
    assert result.exit_code == code, result.output
    if code and "quality" in extra:
        assert "server_error_rate 1 (limit 0.05)" in result.output


ORDER_SCHEMA = {"type": "object", "required": ["item", "quantity"],
                "properties": {"item": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}}}
ORDER_PATTERN = r'\{"item": "\w+", "quantity": \d+\}'


def test_answers_are_checked_against_a_json_schema_and_a_regex_in_every_output(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    day = DAY_ONE + timedelta(hours=1)
    answers = ['{"item": "mug", "quantity": 2}'] * 30 + ['{"item": "mug", "quantity": 0}'] * 5 + ["2 mugs"] * 5
    records = [chat_record(n, day, "a", answers=[answer]) for n, answer in enumerate(answers)]
    records.append(chat_record(99, day, "b", answers=[], status=500, error="engine failed"))
    log = write_log(tmp_path / "log", records)
    schema = tmp_path / "order.schema.json"
    schema.write_text(json.dumps(ORDER_SCHEMA))
    html, report_json, prom = tmp_path / "r.html", tmp_path / "r.json", tmp_path / "r.prom"
    result = invoke(["orders", "--log-dir", str(log), "--training-data", str(training_file(tmp_path)),
                     "--json-schema", str(schema), "--regex", ORDER_PATTERN, "--max-error-rate", "1",
                     "--min-regex-match", "0.8", "--fail-on", "quality",
                     "--html", str(html), "--json", str(report_json), "--prom", str(prom)])

    assert result.exit_code == 1, result.output  # 75% schema-valid, under the 0.95 default
    report = MonitorReport.model_validate_json(report_json.read_text())
    overall = next(r for r in report.quality if r.window is None)
    assert (overall.schema_valid_rate, overall.regex_match_rate, overall.format_checked) == (0.75, 0.875, 40)
    assert all(r.schema_valid_rate == 0.75 for r in report.quality)  # one window: the same figures per window
    assert [(c.check, c.passed) for c in report.checks if c.check in ("schema_valid_rate", "regex_match_rate")] == [
        ("schema_valid_rate", False), ("regex_match_rate", True)]
    assert "schema_valid_rate 0.75 (limit 0.95)" in result.output and "schema valid" in result.output
    assert "87.5%" in result.output and report.json_schema == str(schema) and report.regex == ORDER_PATTERN
    assert "<th>schema valid</th><th>regex match</th>" in html.read_text() and "75.0%" in html.read_text()
    samples = {s.name: s.value for family in text_string_to_metric_families(prom.read_text())
               for s in family.samples}
    assert samples["tunesmith_monitor_schema_valid_rate"] == 0.75
    assert samples["tunesmith_monitor_regex_match_rate"] == 0.875


def test_without_a_schema_or_regex_there_are_no_format_figures_or_columns(tmp_path):
    log = write_log(tmp_path / "log", [chat_record(1, DAY_ONE + timedelta(hours=1), "a")])
    result = invoke(["orders", "--log-dir", str(log), "--training-data", str(training_file(tmp_path))])

    assert result.exit_code == 0, result.output
    assert "schema valid" not in result.output and "regex match" not in result.output


def test_a_tokenizer_folder_counts_the_prompt_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    training = training_file(tmp_path)
    folder = tmp_path / "model"
    folder.mkdir()
    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # "Oslo." is two tokens here, one whitespace word
    words.save(str(folder / "tokenizer.json"))
    report = monitor("orders", "7d", "1d", traffic(tmp_path / "log", shift_from_day=None), training, tokenizer=folder)

    prompts = [json.loads(line)["messages"][0]["content"] for line in training.read_text().splitlines()]
    tokens = {f.feature: f for f in report.drift.features}["prompt_tokens"]
    assert report.drift.token_unit == "tokens (model tokenizer)"
    assert tokens.train_mean == round(float(np.mean([len(re.findall(r"\w+|[^\w\s]+", p)) for p in prompts])), 3)
    assert tokens.train_mean > np.mean([len(p.split()) for p in prompts])


def test_preference_training_data_gives_its_prompts_and_its_chosen_answers(tmp_path):
    rng = random.Random(4)
    prompts = [usual_prompt(rng) for _ in range(100)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": prompt, "chosen": order_answer(rng), "rejected": "no idea"} for prompt in prompts])
    report = monitor("orders", "7d", "1d", traffic(tmp_path / "log", shift_from_day=3), pairs)

    assert report.reference.prompts == 100 and report.reference.answers_json
    assert report.drift.verdict == "significant"
    chars = {f.feature: f for f in report.drift.features}["prompt_chars"]
    assert chars.train_mean == round(float(np.mean([len(prompt) for prompt in prompts])), 3)


def test_the_threshold_options_name_the_defaults_thresholds_applies():
    import typing

    hints = typing.get_type_hints(monitor_command, include_extras=True)
    option_of = {"psi": "psi", "domain_auc": "auc", "max_server_error_rate": "max_error_rate",
                 "max_empty_rate": "max_empty_rate", "max_refusal_rate": "max_refusal_rate",
                 "min_json_valid_rate": "min_json_valid", "max_negative_feedback_rate": "max_negative_rate",
                 "min_schema_valid_rate": "min_schema_valid", "min_regex_match_rate": "min_regex_match",
                 "min_requests": "min_requests"}
    for field, parameter in option_of.items():
        help_text = hints[parameter].__metadata__[0].help
        assert float(re.search(r"\(([\d.]+)\)\.$", help_text)[1]) == getattr(Thresholds(), field), parameter


def bad_log_line(folder: Path) -> Path:
    log = traffic(folder, shift_from_day=None, days=1, per_day=5)
    with (log / "requests.jsonl").open("r+", encoding="utf-8") as handle:
        lines = handle.readlines()
        lines[2] = '{"id": "broken"\n'
        handle.seek(0)
        handle.writelines(lines)
    return log


@pytest.mark.parametrize("case, expected", [
    ("empty window", "no requests in"),
    ("unknown model", "no requests for 'nope' in"),
    ("corrupt line", "requests.jsonl:3: not a request log record (bad JSON"),
    ("no data card", "'orders' has no data card"),
    ("missing training data", "--training-data"),
    ("bad window", "--window 'weekly': give a span such as 1d"),
    ("bad fail-on", "--fail-on speed: use drift or quality"),
    ("no log", "no request log in"),
    ("bad tokenizer", "--tokenizer"),
    ("schema not JSON", "schema.json: not JSON"),
    ("schema not valid", "schema.json: not a valid JSON Schema at properties/item/type"),
    ("bad regex", "--regex '(unclosed': not a valid regular expression"),
])
def test_bad_inputs_give_one_clear_line_and_exit_2(tmp_path, case, expected):
    log = tmp_path / "log"
    training = ["--training-data", str(training_file(tmp_path))]

    def schema(text: str) -> Path:
        path = tmp_path / "schema.json"
        path.write_text(text)
        return path
    args = {"empty window": lambda: ["orders", "--since", "2099-01-01"] + training,
            "unknown model": lambda: ["nope"] + training,
            "corrupt line": lambda: ["orders"] + training,
            "no data card": lambda: ["orders"],
            "missing training data": lambda: ["orders", "--training-data", str(tmp_path / "missing.jsonl")],
            "bad window": lambda: ["orders", "--window", "weekly"] + training,
            "bad fail-on": lambda: ["orders", "--fail-on", "speed"] + training,
            "no log": lambda: ["orders"] + training,
            "bad tokenizer": lambda: ["orders", "--tokenizer", str(tmp_path / "no-model")] + training,
            "schema not JSON": lambda: ["orders", "--json-schema", str(schema("{not json"))] + training,
            "schema not valid": lambda: ["orders", "--json-schema", str(schema(json.dumps(
                {"properties": {"item": {"type": "text"}}})))] + training,
            "bad regex": lambda: ["orders", "--regex", "(unclosed"] + training}[case]()
    if case == "corrupt line":
        bad_log_line(log)
    elif case != "no log":
        traffic(log, shift_from_day=None, days=1, per_day=5)
    result = invoke([*args, "--log-dir", str(log)])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def registry_snapshot(tmp_path: Path, monkeypatch) -> tuple[Path, list]:
    """A stand-in registry whose one version's local copy is a run directory without data/train.jsonl (as
    Registry.local_copy gives), and the (model, version) pairs it was asked for."""
    from tunesmith.records import Manifest
    from tunesmith.registry import store
    from tunesmith.registry.run import write_manifest

    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    training_file(tmp_path).rename(snapshot / "data" / "validation.jsonl")
    write_manifest(snapshot / "manifest.json", Manifest.model_validate({
        "name": "orders", "base_model": {"name": "org/base", "source": "org/base"},
        "data": {"rows": {"train": 1200, "validation": 300}, "dataset_hash": "d", "chat_template_sha": "t"}}))
    asked = []

    class OneVersion:
        def local_copy(self, model: str, version: str) -> Path:
            asked.append((model, version))
            return snapshot

    monkeypatch.setattr(store, "Registry", OneVersion)
    return snapshot, asked


def registry_traffic(tmp_path: Path) -> Path:
    return traffic(tmp_path / "log", shift_from_day=None, days=1, per_day=60, registry_model="orders",
                   registry_version="3")


def test_the_registry_versions_that_answered_supply_the_reference(tmp_path, monkeypatch):
    snapshot, asked = registry_snapshot(tmp_path, monkeypatch)
    log = registry_traffic(tmp_path)
    report = monitor("orders", "7d", "1d", log)

    assert asked == [("orders", "3")] and report.reference.source == "registry" and report.reference.answers_json
    assert report.reference.description.startswith("orders@3 validation split (300 prompts, held out from the same "
                                                    "data: its training split is neither kept")
    assert report.drift.verdict == "stable" and report.drift.token_unit == "whitespace words"
    (snapshot / "data" / "validation.jsonl").unlink()
    with pytest.raises(TunesmithError, match="orders@3 has no data card .*pass --training-data FILE"):
        monitor("orders", "7d", "1d", log)


def test_the_training_split_in_the_run_directory_a_version_came_from_is_the_reference(tmp_path, monkeypatch):
    import shutil

    import yaml

    snapshot, _ = registry_snapshot(tmp_path, monkeypatch)
    original = tmp_path / "runs" / "orders"  # the run directory it was registered from, still holding its split
    (original / "data").mkdir(parents=True)
    training_file(original / "data", rows=500)
    shutil.copyfile(snapshot / "manifest.json", original / "manifest.json")
    (snapshot / "config.yaml").write_text(yaml.safe_dump({
        "name": "orders", "base_model": "org/base", "output_dir": str(tmp_path / "runs"),
        "data": {"train": str(original / "data" / "train.jsonl")}}))
    report = monitor("orders", "7d", "1d", registry_traffic(tmp_path))

    assert report.reference.description == "orders@3 train split (500 prompts)"
    assert report.reference.prompts == 500 and report.reference.answers_json
