"""The way back from production: `tunesmith data from-logs` joins the request log with feedback into training rows
and pairs (redacted, deduplicated against the serving version's data, every request accounted for), and
`tunesmith retrain` trains a child of the served version on them, registers it with its lineage and promotes it
only when it holds the old held-out rows and wins on the new ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tunesmith.cli.loop_commands import from_logs_command, retrain_command
from tunesmith.cli.main import app
from tunesmith.data.formats import read_examples
from tunesmith.records import FeedbackRecord, RequestLogRecord
from tunesmith.request_log import RequestLogWriter, append_feedback, utc_timestamp
from tunesmith.types import ChatExample, PreferenceExample

from conftest import make_trained_run

NOW = datetime.now(timezone.utc)
ITEMS, COLORS = ["Tasse", "Lampe", "Hut", "Stuhl", "Kerze", "Decke"], ["rote", "blaue", "grüne", "gelbe"]
CITIES = ["Berlin", "Wien", "Zürich", "Hamburg", "Graz"]


def german_order(n: int) -> str:
    """A phrasing the parent never saw: the shifted traffic."""
    return (f"Bitte {n % 5 + 2} {COLORS[n % 4]} {ITEMS[n % 6]} nach {CITIES[n % 5]} schicken, "
            f"Bestellung {n} vom Lager {n * 7 % 13}")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def loop_app() -> typer.Typer:
    """The two commands as the lead registers them in cli/main.py."""
    commands = typer.Typer()
    commands.command("from-logs")(from_logs_command)
    commands.command("retrain")(retrain_command)
    return commands


def retrain(*args):
    return CliRunner().invoke(loop_app(), ["retrain", *map(str, args)], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory, tiny_model_dir) -> Path:
    return make_trained_run(tmp_path_factory.mktemp("loop-runs"), tiny_model_dir, "orders", seed=0, steps=2)


@pytest.fixture
def store(tmp_path, monkeypatch):
    from tunesmith.registry.store import Registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return Registry()


@pytest.fixture
def production(store, parent_run):
    """The tiny run registered as orders@1 and serving as orders@production."""
    from tunesmith.registry.register import register_run

    info, _ = register_run(store, parent_run, "orders")
    store.move_alias("orders", "production", info.version, "set", "serving it", {})
    return info


class Traffic:
    """A request log with feedback, written the way the gateway writes them."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.writer = RequestLogWriter(directory, content="full")

    def request(self, text: str, answer: str, hours_ago: float = 1, **fields) -> str:
        record_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        values = {"id": record_id, "time": utc_timestamp(NOW - timedelta(hours=hours_ago)), "endpoint": "chat",
                  "model": "orders", "served": "orders@production", "registry_model": "orders",
                  "registry_version": "1", "messages": [{"role": "user", "content": text}], "answers": [answer],
                  "latency_s": 0.2, "status": 200, **fields}
        self.writer.append(RequestLogRecord(**values))
        return record_id

    def feedback(self, completion_id: str, rating: str, corrected: str | None = None) -> None:
        append_feedback(self.directory, FeedbackRecord(id=f"fb-{uuid.uuid4().hex[:8]}", time=utc_timestamp(),
                                                       completion_id=completion_id, rating=rating, corrected=corrected))


def training_row(run_dir: Path, split: str, index: int = 0) -> tuple[str, str]:
    row = json.loads((run_dir / "data" / f"{split}.jsonl").read_text().splitlines()[index])
    return row["messages"][-2]["content"], row["messages"][-1]["content"]


def test_from_logs_joins_feedback_into_rows_and_pairs_accounting_for_every_request(tmp_path, production, parent_run):
    traffic = Traffic(tmp_path / "log")
    wrong, right = '{"item": "Tasse"}', '{"item": "mug", "quantity": 2, "color": "red", "city": "Berlin"}'
    corrected = traffic.request(german_order(1), wrong)
    traffic.feedback(corrected, "negative", right)
    traffic.feedback(traffic.request(german_order(1), wrong), "negative", right)  # the same correction again
    approved = traffic.request("Please ship four teal umbrellas to Quito", '{"item": "umbrella"}')
    traffic.feedback(approved, "negative")
    traffic.feedback(approved, "positive")  # a later verdict on the same answer replaces the earlier one
    traffic.feedback(traffic.request(german_order(2), wrong), "neutral")
    traffic.feedback(traffic.request(german_order(3), wrong), "negative")
    traffic.request(german_order(4), wrong)  # no feedback
    traffic.feedback(traffic.request(german_order(5), "", status=500, answers=[], error="boom"), "negative", right)
    traffic.request(german_order(6), wrong, shadow=True)
    traffic.feedback(traffic.request(german_order(7), wrong, content="none", messages=None, answers=[]), "positive")
    trained_prompt, trained_answer = training_row(parent_run, "train")
    traffic.feedback(traffic.request(trained_prompt, trained_answer), "positive")
    held_prompt, held_answer = training_row(parent_run, "validation")
    traffic.feedback(traffic.request(held_prompt, held_answer + " thanks"), "positive")  # near: one word more
    traffic.feedback(traffic.request(german_order(8), wrong, model="support", served="support@production",
                                     registry_model="support"), "positive")
    traffic.feedback(traffic.request(german_order(9), wrong, hours_ago=24 * 30), "negative", right)  # too old
    traffic.feedback("chatcmpl-never-logged", "negative", right)

    out = tmp_path / "new.jsonl"
    result = invoke("data", "from-logs", "orders", "--since", "7d", "--log-dir", traffic.directory, "--out", out)
    assert result.exit_code == 0, result.output

    card = json.loads((tmp_path / "new.card.json").read_text())
    accounting = card["accounting"]
    assert accounting["read"] == 11 == accounting["kept"] + sum(accounting["dropped"].values())
    assert accounting["kept"] == 2
    assert accounting["dropped"] == {"exact_duplicate": 1, "neutral": 1, "negative_without_correction": 1,
                                     "no_feedback": 1, "failed": 1, "shadow": 1, "content_none": 1,
                                     "exact_duplicate_of_training": 1, "near_duplicate_of_training": 1}
    assert card["rows"] == {"corrected": 1, "approved": 1, "pairs": 1}
    assert card["feedback"]["unmatched"] == 3 and card["feedback"]["superseded"] == 1  # support, too old, never logged
    assert card["window"]["since"] < card["window"]["until"] and card["feedback"]["sha256"]
    assert card["served"] == {"orders@1": 11}
    assert "read 11 requests of orders" in result.output and "1 preference pairs" in result.output

    rows = read_examples(out)  # the data stage's own reader takes both files as they are
    assert all(isinstance(row, ChatExample) for row in rows)
    assert [(row.messages[0].content, row.messages[-1].content) for row in rows] == [
        (german_order(1), right), ("Please ship four teal umbrellas to Quito", '{"item": "umbrella"}')]
    pairs = read_examples(tmp_path / "new.pairs.jsonl")
    assert len(pairs) == 1 and isinstance(pairs[0], PreferenceExample)
    assert (pairs[0].chosen, pairs[0].rejected) == (right, wrong)


def test_from_logs_redacts_pii_unless_told_not_to_and_honours_use(tmp_path):
    traffic = Traffic(tmp_path / "log")
    answer = traffic.request("Send 3 lamps to Oslo, mail me at ana@example.org", '{"item": "lamp"}')
    traffic.feedback(answer, "negative", '{"item": "lamp", "note": "call +1 415 555 0134"}')
    traffic.feedback(traffic.request("Two mugs for Lima", '{"item": "mug"}'), "positive")

    out = tmp_path / "new.jsonl"
    result = invoke("data", "from-logs", "orders", "--log-dir", traffic.directory, "--out", out, "--against", "none",
                    "--use", "corrected")
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "ana@example.org" not in text and "[EMAIL]" in text and "[PHONE]" in text
    card = json.loads((tmp_path / "new.card.json").read_text())
    assert card["rows"] == {"corrected": 1, "approved": 0, "pairs": 0} and card["accounting"]["dropped"] == {"not_in_use": 1}
    assert card["redaction"]["redacted"] == {"email": 1, "phone": 1} and not (tmp_path / "new.pairs.jsonl").exists()

    kept = invoke("data", "from-logs", "orders", "--log-dir", traffic.directory, "--out", out, "--against", "none",
                  "--no-redact", "--use", "corrected,approved")
    assert kept.exit_code == 0, kept.output
    assert "ana@example.org" in out.read_text() and len(read_examples(out)) == 2


def test_from_logs_errors_are_one_clear_line(tmp_path):
    traffic = Traffic(tmp_path / "log")
    traffic.feedback(traffic.request("Two mugs for Lima", '{"item": "mug"}', hours_ago=24 * 20), "positive")

    empty = invoke("data", "from-logs", "orders", "--since", "7d", "--log-dir", traffic.directory,
                   "--out", tmp_path / "new.jsonl")
    assert empty.exit_code == 2 and "no requests for orders in" in empty.output and "widen --since" in empty.output
    assert not (tmp_path / "new.jsonl").exists()

    nothing = invoke("data", "from-logs", "orders", "--since", "30d", "--log-dir", traffic.directory,
                     "--out", tmp_path / "new.jsonl", "--use", "pairs", "--against", "none")
    assert nothing.exit_code == 2 and "nothing to train on from 1 requests" in nothing.output
    assert "1 not_in_use" in nothing.output

    missing = invoke("data", "from-logs", "orders", "--log-dir", traffic.directory, "--against", tmp_path / "x.jsonl")
    assert missing.exit_code == 2 and "no such data file or run directory" in missing.output
    bad_use = invoke("data", "from-logs", "orders", "--log-dir", traffic.directory, "--use", "corrections")
    assert bad_use.exit_code == 2 and "choose one or more of corrected, approved, pairs" in bad_use.output
    unknown_versions = invoke("data", "from-logs", "orders", "--since", "30d", "--log-dir", traffic.directory,
                              "--out", tmp_path / "new.jsonl")
    assert unknown_versions.exit_code == 2 and "answered by orders@1" in unknown_versions.output
    assert "no registered model 'orders'" in unknown_versions.output


def test_a_versions_training_split_is_found_or_rebuilt_and_checked(tmp_path, production, store):
    from tunesmith.errors import TunesmithError
    from tunesmith.registry.retrain import training_split

    copy = store.local_copy("orders", "1")
    assert not (copy / "data" / "train.jsonl").exists()  # the registry keeps the validation split only
    original = training_split(copy, tmp_path / "scratch")
    assert original.parent.parent.name == "orders" and original.name == "train.jsonl"

    moved = tmp_path / "moved"
    shutil.copytree(copy, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["output_dir"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    rebuilt = training_split(moved, tmp_path / "scratch")  # from the config's source files, checked by hash
    assert rebuilt == tmp_path / "scratch" / "train.jsonl" and rebuilt.read_text() == original.read_text()

    config["data"]["train"] = str(tmp_path / "missing.jsonl")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(TunesmithError, match="source files are missing"):
        training_split(moved, tmp_path / "scratch2")


def new_data(tmp_path: Path, rows: int = 24) -> Path:
    """from-logs output for shifted traffic whose every answer was corrected to a short fixed reply."""
    traffic = Traffic(tmp_path / "log")
    for n in range(rows):
        traffic.feedback(traffic.request(german_order(n), '{"item": "Tasse"}'), "negative", "ok")
    out = tmp_path / "new.jsonl"
    result = invoke("data", "from-logs", "orders", "--log-dir", traffic.directory, "--out", out, "--use", "corrected")
    assert result.exit_code == 0, result.output
    return out


def test_retrain_dry_run_prints_the_plan_and_writes_nothing(tmp_path, production, monkeypatch):
    data = new_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = retrain("orders", "--data", data, "--replay", "0.5", "--held-out", "0.25", "--dry-run",
                     "--promote-to", "production", "--name", "child")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "parent orders@1 (orders@production)" in out
    assert "24 rows -> 20 train + 4 held out" in out
    assert "replay 0.5 x 30 distinct training rows of the parent = about 15 rows" in out
    assert "10 old (the parent's validation split) + 4 new" in out
    assert "train.init_from: None ->" in out and "data.sources: [] ->" in out and "name: 'orders' -> 'child'" in out
    assert "promote to production if exact_match holds" in out
    runs = Path(yaml.safe_load((production_copy(production) / "config.yaml").read_text())["output_dir"])
    assert not (runs / "child").exists() and not (runs / "child.inputs").exists()

    other_base = retrain("orders", "base_model=someorg/another-model", "--data", data, "--dry-run")
    assert other_base.exit_code == 2 and "retrain continues the parent's weights" in other_base.output
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"input": {"messages": [{"role": "user", "content": german_order(n)}]},
                                         "preferred_output": [{"role": "assistant", "content": "ok"}],
                                         "non_preferred_output": [{"role": "assistant", "content": "no"}]}) + "\n"
                             for n in range(3)))
    not_sft = retrain("orders", "--data", pairs, "--dry-run")
    assert not_sft.exit_code == 2 and "holds preference rows" in not_sft.output


def production_copy(info):
    from tunesmith.registry.store import Registry

    return Registry().local_copy(info.model, info.version)


def test_retrain_registers_a_child_with_its_lineage_and_promotes_only_past_the_gates(tmp_path, production, store):
    data = new_data(tmp_path)
    card = json.loads((tmp_path / "new.card.json").read_text())
    runs = tmp_path / "runs"

    # One step learns nothing: no win on the new rows, so the child is registered but not promoted.
    weak = retrain("orders", "--data", data, "--held-out", "0.25", "--promote-to", "production", "--name", "weak",
                   f"output_dir={runs}", "train.max_steps=1")
    assert weak.exit_code == 1, weak.output
    assert "new held-out rows (4)" in weak.output and "not promoted: orders@2 stays off production" in weak.output
    assert store.resolve("orders@production") == ("orders", "1")
    lineage = store.version_info("orders", "2").lineage
    assert lineage.parent["version"] == "orders@1"
    retrained = lineage.train["retrain"]
    assert retrained["parent"]["version"] == "orders@1" and retrained["window"] == card["window"]
    assert retrained["feedback"]["sha256"] == card["feedback"]["sha256"] and retrained["feedback"]["records"] == 24
    assert retrained["from_logs"]["rows"]["corrected"] == 24 and retrained["replay"]["share"] == 0.5
    assert retrained["comparison"]["subsets"]["old"]["examples"] == 10 and not retrained["comparison"]["passed"]
    assert lineage.config["train"]["init_from"] and lineage.config["data"]["sources"][0]["weight"] == 0.5
    assert set(lineage.evaluation["results"]) == {"base", "fine-tuned", "champion"}  # the parent beside it

    # Enough steps to learn the corrected reply: it wins on the new rows, holds the old ones, and is promoted.
    # (The tiny model learns the reply's two tokens long before it learns to stop, so answers are two tokens.)
    strong = retrain("orders", "--data", data, "--held-out", "0.25", "--promote-to", "production", "--name", "strong",
                     f"output_dir={runs}", "train.max_steps=80", "train.learning_rate=0.03", "evaluate.max_new_tokens=2")
    assert strong.exit_code == 0, strong.output
    assert "promoted orders@production: 1 -> 3" in strong.output
    move = store.history("orders", "production")[-1]  # the child's own evaluation was the evidence
    assert (move.from_version, move.to_version) == ("1", "3") and move.evidence["retrain"]["passed"]
    assert move.evidence["results"]["champion"] and move.evidence["reused"]
    comparison = store.version_info("orders", "3").lineage.train["retrain"]["comparison"]
    assert comparison["subsets"]["new"]["results"]["fine-tuned"]["exact_match"] == 1.0
    assert comparison["subsets"]["new"]["results"]["champion"]["exact_match"] == 0.0 and comparison["passed"]


def test_the_drift_examples_traffic_turns_into_corrections_of_the_shifted_requests(tmp_path):
    script = Path(__file__).resolve().parents[2] / "examples" / "drift" / "make_traffic.py"
    made = subprocess.run([sys.executable, str(script), "--log-dir", str(tmp_path / "requests"), "--answers",
                           "synthetic", "--per-day", "12"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert "wrote 84 requests" in made.stdout

    out = tmp_path / "new.jsonl"
    result = invoke("data", "from-logs", "orders", "--log-dir", tmp_path / "requests", "--out", out,
                    "--use", "corrected", "--against", "none")
    assert result.exit_code == 0, result.output
    prompts = [row.messages[1].content for row in read_examples(out)]
    wholesale = [p for p in prompts if any(word in p for word in ("dozen", "pair of", "couple of"))]
    assert len(prompts) >= 10 and len(wholesale) >= 0.8 * len(prompts)  # the corrections are where the drift is
