"""A run that continued from a parent (`train.init_from`) is evaluated against it: paired comparisons, `parent`
gates, and plain words in every report when the child lost ground."""

from __future__ import annotations

import html
import json
import shutil

import pytest
from conftest import make_trained_run

from tunesmith.config import load_run_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.run import evaluate_run

FAST = ["evaluate.max_new_tokens=4", "evaluate.bootstrap_samples=300"]


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_model_dir):
    """A 4-step parent run and a child that continued from it for 4 more steps (same data)."""
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.train.sft import train_sft

    root = tmp_path_factory.mktemp("family")
    parent_dir = make_trained_run(root, tiny_model_dir, "parent", seed=0, steps=4)
    config = load_config(root / "parent.yaml", ["name=child", f"train.init_from={parent_dir}"])
    child_dir = prepare(config)
    train_sft(child_dir, config)
    return parent_dir, child_dir


def test_the_parent_is_evaluated_beside_the_child_and_compared_pair_by_pair(family):
    parent_dir, child_dir = family
    report = evaluate_run(child_dir, load_run_config(child_dir, FAST), gates=["token_f1 >= parent - 1"])

    assert list(report["results"]) == ["base", "fine-tuned", "parent"]
    assert report["models"]["parent"]["run_dir"] == str(parent_dir.resolve())
    losses = {label: report["results"][label]["validation_loss"] for label in report["results"]}
    assert len(set(losses.values())) == 3  # the parent's own adapter answered, not the child's or the base
    against = report["against_parent"]
    assert against["label"] == "parent" and against["name"] == "parent"
    assert {"exact_match", "token_f1", "json_valid", "field:item"} <= against["metrics"].keys()
    assert against["metrics"]["exact_match"]["base"] == report["results"]["parent"]["exact_match"]
    # The parent is a reference, not a model the gates judge.
    assert [(g["model"], g["passed"]) for g in report["gates"]] == [("fine-tuned", True)]
    markdown = (child_dir / "eval" / "report.md").read_text()
    assert "| fine-tuned vs parent |" in markdown and "## Against its parent" in markdown

    alone = evaluate_run(child_dir, load_run_config(child_dir, [*FAST, "evaluate.compare_parent=false"]))
    assert list(alone["results"]) == ["base", "fine-tuned"] and "against_parent" not in alone
    with pytest.raises(TunesmithError, match="compares with the parent, but .* has none"):
        evaluate_run(parent_dir, load_run_config(parent_dir, FAST), gates=["exact_match >= parent"])


def test_a_child_worse_than_its_parent_is_told_in_words_and_fails_a_parent_gate(family, tmp_path, monkeypatch):
    """Answers are scripted (the parent right on every example and general question, the others wrong) so the loss
    is certain."""
    import tunesmith.evaluate.run as stage
    from tunesmith.cli.output import evaluated
    from tunesmith.evaluate.generate import Generation
    from tunesmith.registry.run import Run

    child_dir = family[1]
    answering = {}
    real_switch = stage.switched_to

    def recording_switch(model, contender):
        answering["label"] = contender.label
        return real_switch(model, contender)

    right = {e.messages[-2].content: e.reference() for e in stage.evaluation_examples(Run.open(child_dir))}

    def scripted(model, tokenizer, conversations, *args, **kwargs):
        correct = answering["label"] == "parent"
        return [[Generation(right[c[-1]["content"]] if correct else "no idea", 3, True)] for c in conversations]

    def scripted_general(*args, **kwargs):
        known = [float(answering["label"] == "parent")] * 20
        return {"general_ppl": 10.0, "general_qa": known[0], "per_question": known, "answers": ["?"] * 20}

    monkeypatch.setattr(stage, "switched_to", recording_switch)
    monkeypatch.setattr(stage, "sample_batched", scripted)
    monkeypatch.setattr(stage, "general_check", scripted_general)
    config = load_run_config(child_dir, [*FAST, "evaluate.general_check=true"])
    report = evaluate_run(child_dir, config, gates=["exact_match >= parent - 0.05", "general_qa >= parent - 0.05"])

    lost = {row["metric"]: row for row in report["against_parent"]["lost_ground"]}
    assert lost["exact_match"]["parent"] == 1.0 and lost["exact_match"]["child"] == 0.0
    assert lost["general_qa"]["delta"] == -1.0 and "token_f1" in lost  # forgetting, judged against the parent too
    assert [g["passed"] for g in report["gates"]] == [False, False] and not report["passed"]
    assert report["gates"][0]["threshold"] == pytest.approx(0.95)
    sentence = "lost ground against its parent (parent): exact_match 1.000 -> 0.000 (-100.0 points, significant"
    assert sentence in (child_dir / "eval" / "report.md").read_text()
    assert sentence in html.unescape((child_dir / "eval" / "report.html").read_text())
    saved = json.loads((child_dir / "eval" / "report.json").read_text())
    assert saved["version"] == 2 and saved["against_parent"]["lost_ground"][0]["metric"] == "exact_match"

    from tunesmith.cli import output

    with output.console.capture() as captured:
        evaluated(child_dir, report)
    assert sentence in " ".join(captured.get().split())


def test_a_moved_parent_is_one_clear_error(family, tmp_path):
    parent_dir, child_dir = family
    orphan = shutil.copytree(child_dir, tmp_path / "orphan")
    manifest = json.loads((orphan / "manifest.json").read_text())
    manifest["train"]["parent"]["run_dir"] = str(tmp_path / "gone")
    (orphan / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TunesmithError, match="which is gone; restore it .* evaluate.compare_parent=false"):
        evaluate_run(orphan, load_run_config(orphan, FAST))
