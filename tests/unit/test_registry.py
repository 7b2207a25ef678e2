"""The registry on a local MLflow store: content-addressed versions, lineage, model cards, aliases with history,
eval-gated promotion and rollback, and every bad input as one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith.cli.main import app
from tunesmith.errors import TunesmithError

from conftest import make_trained_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("registry-runs")
    return {"first": make_trained_run(folder, tiny_model_dir, "orders", seed=0, steps=2),
            "second": make_trained_run(folder / "b", tiny_model_dir, "orders", seed=1, steps=6)}


@pytest.fixture
def store(tmp_path, monkeypatch):
    from tunesmith.registry.store import Registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return Registry()


def test_registering_twice_gives_the_same_immutable_version_with_full_lineage(store, runs):
    from tunesmith.registry.register import register_run
    from tunesmith.registry.run import Run

    info, created = register_run(store, runs["first"], "orders")
    again, created_again = register_run(store, runs["first"], "orders")
    assert created and not created_again and (info.version, again.version) == ("1", "1")
    lineage = info.lineage
    run = Run.open(runs["first"])
    assert lineage.data["dataset_hash"] == run.manifest.data.dataset_hash
    assert lineage.weights_sha256 == run.trained.weights_sha256 and len(lineage.content_id) == 64
    assert lineage.base_model["weights_sha256"] and lineage.base_model["source"] == run.base_source
    assert lineage.config["train"]["max_steps"] == 2 and lineage.code.tunesmith
    assert lineage.environment["libraries"]["transformers"]
    assert set(lineage.evaluation["results"]) == {"base", "fine-tuned"}
    assert "exact_match" in lineage.evaluation["comparisons"]["fine-tuned"]  # the difference with its interval
    # The snapshot holds what serving and exports need, verified against the registered hashes.
    copy = store.local_copy("orders", "1")
    assert (copy / "adapter" / "adapter_model.safetensors").is_file() and (copy / "data" / "validation.jsonl").is_file()
    assert Run.open(copy).trained.weights_sha256 == lineage.weights_sha256


def test_the_model_card_is_a_valid_hugging_face_card(store, runs):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from tunesmith.registry.register import card_text, register_run

    info, _ = register_run(store, runs["first"], "orders")
    card = ModelCard(card_text(store, "orders", info.version))
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "peft" and "tunesmith" in metadata["tags"]
    assert metadata["base_model"] == Path(info.lineage.base_model["name"]).name
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "orders-v1" and {r.metric_type for r in results} >= {"exact_match", "json_valid"}
    for section in ("## Intended use", "## Training data", "## Training procedure", "## Evaluation against the base",
                    "## Forgetting check", "## Limitations", "## Hardware and time", "## Lineage"):
        assert section in card.text


def test_promotion_is_gated_on_the_champion_recorded_and_rolled_back(store, runs, monkeypatch):
    from tunesmith.registry.register import register_run

    register_run(store, runs["first"], "orders")
    second, _ = register_run(store, runs["second"], "orders")
    assert second.version == "2"
    cli = CliRunner()
    first_promotion = cli.invoke(app, ["promote", "orders@1", "--to", "production",
                                       "--gate", "exact_match >= champion + 0.5"])
    assert first_promotion.exit_code == 0, first_promotion.output
    assert "skipping exact_match >= champion + 0.5" in first_promotion.output  # nobody to beat yet

    refused = cli.invoke(app, ["promote", "orders@2", "--to", "production", "--gate", "exact_match >= champion + 2"])
    assert refused.exit_code == 1 and "FAILED" in refused.output and "not promoted" in refused.output
    assert store.resolve("models:/orders@production") == ("orders", "1")

    # The same pair with the same settings: the stored evaluation is reused, not run again.
    import tunesmith.evaluate.run as evaluate_module

    monkeypatch.setattr(evaluate_module, "evaluate_run", lambda *a, **k: pytest.fail("evaluated again"))
    passed = cli.invoke(app, ["promote", "orders@2", "--to", "production", "--gate", "stop_rate >= 0",
                              "--why", "better on held-out"])
    assert passed.exit_code == 0, passed.output
    assert "reusing the stored evaluation" in passed.output
    assert store.resolve("orders@production") == ("orders", "2")

    rolled = cli.invoke(app, ["rollback", "orders"])
    assert rolled.exit_code == 0 and "2 -> 1" in rolled.output
    assert store.resolve("orders@production") == ("orders", "1")
    moves = store.history("orders")
    assert [(m.kind, m.from_version, m.to_version) for m in moves] == [
        ("promote", None, "1"), ("promote", "1", "2"), ("rollback", "2", "1")]
    assert moves[1].why == "better on held-out" and moves[1].evidence["gates"][0]["passed"]
    assert "champion" in moves[1].evidence["results"]
    again = cli.invoke(app, ["rollback", "orders"])
    assert again.exit_code != 0 and "no earlier holder" in str(again.exception)
    shown = cli.invoke(app, ["registry", "history", "orders", "--json"])
    assert len(json.loads(shown.output)) == 3


def test_registry_show_and_list_print_lineage(store, runs):
    from tunesmith.registry.register import register_run

    register_run(store, runs["first"], "orders")
    cli = CliRunner()
    shown = cli.invoke(app, ["registry", "show", "orders@1", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["lineage"]["data"]["dataset_hash"]
    table = cli.invoke(app, ["registry", "show", "orders"], env={"COLUMNS": "200"})
    assert "content id" in table.output and "exact_match" in table.output
    listed = cli.invoke(app, ["registry", "list", "--json"])
    assert json.loads(listed.output)[0]["versions"][0]["version"] == "1"


def test_a_failed_registration_leaves_nothing_registered(store, runs, monkeypatch):
    from tunesmith.registry.register import register_run

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store.client, "log_text", broken)
    with pytest.raises(TunesmithError, match="disk full"):
        register_run(store, runs["first"], "orders")
    monkeypatch.undo()
    with pytest.raises(TunesmithError, match="no versions yet|no registered model"):
        store.resolve("orders")
    info, created = register_run(store, runs["first"], "orders")
    assert created and info.version  # a clean retry registers it


@pytest.mark.parametrize("reference, message", [
    ("nothere@1", "no registered model 'nothere'"), ("orders@7", "has no version 7"),
    ("orders@staging", "has no alias 'staging'"), ("or ders", "is not a model reference"),
])
def test_unknown_versions_and_aliases_are_one_clear_error(store, runs, reference, message):
    from tunesmith.registry.register import register_run

    register_run(store, runs["first"], "orders")
    with pytest.raises(TunesmithError, match=message):
        store.resolve(reference)


def test_edited_weights_and_tampered_copies_are_refused(store, runs, tmp_path):
    from tunesmith.registry.register import register_run

    edited = tmp_path / "edited"
    shutil.copytree(runs["first"], edited)
    weights = edited / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(TunesmithError, match="changed after training"):
        register_run(store, edited, "orders")
    info, _ = register_run(store, runs["first"], "orders")
    copy = store.local_copy("orders", info.version)
    (copy / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(TunesmithError, match="do not match their registered hashes.*adapter_config.json"):
        store.local_copy("orders", info.version)


def test_an_untrained_run_cannot_be_registered(store, runs, tmp_path):
    from tunesmith.registry.run_dir import read_json, write_json_atomic

    untrained = tmp_path / "untrained"
    shutil.copytree(runs["first"], untrained)
    manifest = read_json(untrained / "manifest.json")
    del manifest["train"]
    write_json_atomic(untrained / "manifest.json", manifest)
    result = CliRunner().invoke(app, ["register", str(untrained)])
    assert result.exit_code != 0 and "has not been trained yet" in str(result.exception)


def test_an_unreachable_mlflow_server_is_one_clear_error(monkeypatch):
    import socket

    from tunesmith.registry.store import Registry

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(TunesmithError, match="unreachable.*unset MLFLOW_TRACKING_URI"):
        Registry()


def test_a_run_config_registers_tracks_and_promotes_by_itself(store, tiny_config):
    result = CliRunner().invoke(app, ["run", str(tiny_config), "evaluate.general_check=false",
                                      "registry.name=orders", "registry.promote_to=production",
                                      "registry.promote_if=[stop_rate >= 0]"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "registered orders@1" in result.output and "promoted orders@production: - -> 1" in result.output
    info = store.version_info(*store.resolve("orders@production"))
    run = store.client.get_run(info.mlflow_run_id)
    assert run.data.params["train.max_steps"] == "4"  # the params, curves and metrics of that run
    assert len(store.client.get_metric_history(run.info.run_id, "train_loss")) == 4
    assert "eval.fine-tuned.exact_match" in run.data.metrics


def test_serve_and_chat_take_a_registered_version_as_its_verified_copy(store, runs):
    from tunesmith.registry.register import register_run
    from tunesmith.serve.engine import ServingEngine
    from tunesmith.serve.targets import resolve_targets

    info, _ = register_run(store, runs["first"], "orders")
    store.move_alias("orders", "production", info.version, "set", "test", {})
    (target,) = resolve_targets(["orders@production"])
    assert target.run.trained.weights_sha256 == info.lineage.weights_sha256 and target.version == info.version
    assert target.run_dir != runs["first"]  # the registry's verified copy, not the original folder
    assert resolve_targets([str(runs["first"])])[0].run_dir == runs["first"]
    assert ServingEngine.from_references(["orders@production"], default_max_tokens=4).adapter_name == "orders@production"


def test_serve_takes_two_versions_and_an_alias_of_one_model_on_one_shared_base(store, runs):
    from tunesmith.registry.register import register_run
    from tunesmith.serve.engine import ServingEngine

    first, _ = register_run(store, runs["first"], "orders")
    second, _ = register_run(store, runs["second"], "orders")
    store.move_alias("orders", "production", first.version, "set", "test", {})
    engine = ServingEngine.from_references(["orders@production", f"orders@{second.version}"], default_max_tokens=4)
    cards = {card.id: card for card in engine.model_cards()}
    assert list(cards)[:2] == ["orders@production", f"orders@{second.version}"]
    assert cards["orders@production"].parent == cards[f"orders@{second.version}"].parent is not None
    groups = {id(engine.models[name].route.group) for name in cards}
    assert len(groups) == 1  # both versions and the base on one copy of it
    with pytest.raises(TunesmithError, match="already uses"):
        ServingEngine.from_references(["orders@production", f"orders@{first.version}", "orders@production"])


def test_the_same_run_registered_in_two_stores_gets_a_verified_copy_from_each(store, runs, tmp_path, monkeypatch):
    from tunesmith.registry.register import register_run
    from tunesmith.registry.store import Registry

    first, _ = register_run(store, runs["first"], "orders")
    assert store.local_copy("orders", first.version).is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    other = Registry()
    second, _ = register_run(other, runs["first"], "orders")  # the run's manifest now records the first store
    assert second.lineage.content_id == first.lineage.content_id
    assert second.lineage.files_sha256 != first.lineage.files_sha256
    assert other.local_copy("orders", second.version) != store.local_copy("orders", first.version)


def test_an_empty_registry_says_how_to_register_and_unknown_names_are_one_clear_error(store):
    cli = CliRunner()
    listed = cli.invoke(app, ["registry", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "nothing is registered yet" in listed.output
    assert "tunesmith register RUN" in listed.output and "┏" not in listed.output
    assert cli.invoke(app, ["registry", "list", "--json"]).output.strip() == "[]"
    for command in (["rollback", "nothere"], ["registry", "history", "nothere"]):
        result = cli.invoke(app, command)
        assert result.exit_code != 0 and isinstance(result.exception, TunesmithError), command
        assert "no registered model 'nothere' (registered: none yet)" in str(result.exception)
        assert "Registered Model with name" not in str(result.exception)


def test_history_keeps_versions_and_aliases_whole_on_a_narrow_terminal(monkeypatch):
    from rich.console import Console

    from tunesmith.cli import registry_view
    from tunesmith.records import AliasMove

    console = Console(width=80, record=True)
    monkeypatch.setattr(registry_view, "console", console)
    moves = [AliasMove(model="orders-classifier", alias="production-europe", kind=kind, from_version=old,
                       to_version=new, when="2026-12-01T17:13:30+00:00", why="a reason long enough to wrap twice over",
                       evidence={"rolled_back": old or "-"}) for kind, old, new in
             (("promote", None, "1042"), ("promote", "1042", "1043"), ("rollback", "1043", "1042"))]
    registry_view.print_history("orders-classifier", moves)
    shown = console.export_text()
    assert shown.count("production-europe") == 3 and "rollback" in shown and "1043" in shown and "…" not in shown
    registry_view.print_history("orders-classifier", [])
    assert "no alias moves yet" in console.export_text()
