"""Changing what is served while serving: a registry alias that moves, versions loaded and unloaded at runtime
(the admin routes too), adapter slots added and freed on a shared base, and pickled weights refused."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from conftest import make_trained_run

from tunesmith.errors import TunesmithError
from tunesmith.serve.engine import ModelNotFound, ServingEngine
from tunesmith.serve.protocol import ChatCompletionRequest

PROMPT = [{"role": "user", "content": "Send 3 blue mug to Denver (ref 7)"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("reload-versions")
    return [make_trained_run(root / f"v{seed}", tiny_model_dir, "orders", seed, steps=6) for seed in (1, 2)]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, runs):
    """Both runs registered as orders@1 and orders@2 in a store shared by this module's tests."""
    from tunesmith.registry.register import register_run
    from tunesmith.registry.store import Registry

    folder = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:  # module-scoped, so set before each test's own home is
        patch.setenv("TUNESMITH_HOME", str(folder / "home"))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        store = Registry()
        for run in runs:
            register_run(store, run, "orders")
        yield store


def ask(engine: ServingEngine, model: str, max_tokens: int = 12) -> str:
    return engine.generate(ChatCompletionRequest(model=model, messages=PROMPT, max_tokens=max_tokens)).text


def wait_until(condition, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_an_alias_move_is_served_live_and_no_request_fails(registered):
    registered.move_alias("orders", "production", "1", "promote", "first release", {})
    engine = ServingEngine.from_references(["orders@production"], default_max_tokens=12)
    before = ask(engine, "orders@production")
    answers, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                answers.append(ask(engine, "orders@production"))
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                failures.append(exc)

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    assert wait_until(lambda: len(answers) >= 3)
    registered.move_alias("orders", "production", "2", "promote", "better", {})
    changes = engine.refresh_aliases()
    after = ask(engine, "orders@production")
    moved_at = len(answers)
    assert wait_until(lambda: len(answers) >= moved_at + 3)
    stop.set()
    for thread in clients:
        thread.join()
    alone = ask(ServingEngine.from_references(["orders@2"], serve_base=False), "orders@2")
    assert failures == [] and changes == ["orders@production: now serves orders@2 (was orders@1)"]
    assert after == alone and after != before
    assert set(answers) <= {before, after}  # each request answered wholly by one version
    assert engine.served_version("orders@production") == ("orders", "2")
    assert engine.refresh_aliases() == []  # nothing moved since
    assert wait_until(lambda: "orders@1" not in engine.versions)  # the old version is freed once unused
    assert "orders@1" not in engine.batching.routes
    engine.stop()


def test_a_bad_new_version_leaves_the_old_one_serving(registered, monkeypatch):
    import tunesmith.serve.loading as loading

    registered.move_alias("orders", "production", "1", "promote", "first release", {})
    engine = ServingEngine.from_references(["orders@production"], default_max_tokens=6)
    registered.move_alias("orders", "production", "2", "promote", "broken", {})

    def broken(target):
        raise TunesmithError(f"{target.run.weights_dir}: broken weights")

    monkeypatch.setattr(loading, "check_weights", broken)
    changes = engine.refresh_aliases()
    assert len(changes) == 1 and changes[0].startswith("orders@production: still serves orders@1; could not switch")
    assert "broken weights" in changes[0] and engine.served_version("orders@production") == ("orders", "1")
    assert ask(engine, "orders@production", 4)
    engine.stop()


def test_a_version_loaded_at_runtime_stacks_on_the_base_and_unloading_lets_requests_finish(registered):
    engine = ServingEngine.from_references(["orders@1"], default_max_tokens=12)
    assert engine.load("orders@2") == "orders@2"
    group = engine.models["orders@1"].route.group
    assert engine.models["orders@2"].route.group is group  # a new slot on the one base copy
    assert engine.load("orders@2") == "orders@2" and len(engine.versions) == 3  # loading again changes nothing
    alone = ask(ServingEngine.from_references(["orders@2"], serve_base=False), "orders@2")
    assert ask(engine, "orders@2") == alone != ask(engine, "orders@1")

    stream = engine.stream(ChatCompletionRequest(model="orders@2", messages=PROMPT, max_tokens=300))
    next(stream)
    paused, resume = threading.Event(), threading.Event()
    engine.batching.call_between_steps(lambda: (paused.set(), resume.wait(30)))  # hold the engine between steps
    assert paused.wait(30)
    in_flight = engine.batching.running_by_model().get("orders@2", 0)
    engine.unload("orders@2")
    with pytest.raises(ModelNotFound):
        engine.check_model("orders@2")
    resume.set()
    rest = list(stream)
    assert in_flight == 1 and rest[-1].finish_reason in {"stop", "length"}
    assert wait_until(lambda: "orders@2" not in engine.versions)
    assert group.adapter_rows.unused and "orders@2" not in engine.batching.routes

    engine.load("orders@2")  # the freed slot is taken again, with the same answers
    assert not group.adapter_rows.unused and ask(engine, "orders@2") == alone
    with pytest.raises(ModelNotFound):
        engine.unload("orders@9")
    engine.stop()


def test_a_dora_version_loaded_at_runtime_decodes_on_a_model_of_its_own_until_unloaded(runs, tiny_config):
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.train.sft import train_sft

    config = load_config(tiny_config, ["name=dora", "train.adapter=dora", "train.max_steps=3"])
    dora_dir = prepare(config)
    train_sft(dora_dir, config)
    engine = ServingEngine.from_references([str(runs[0])], default_max_tokens=4)
    assert engine.load(str(dora_dir)) == "dora"
    dora = engine.models["dora"]
    assert "DoRA" in dora.note and len(engine.batching.groups) == 2 and dora.route.group in engine.batching.groups
    reply = engine.generate(ChatCompletionRequest(model="dora", messages=PROMPT, max_tokens=4))
    assert reply.completion_tokens >= 1
    engine.unload("dora")
    assert wait_until(lambda: len(engine.batching.groups) == 1)  # its model copy is dropped once unused
    assert dora.route.group not in engine.batching.groups
    assert engine.generate(ChatCompletionRequest(model="orders", messages=PROMPT, max_tokens=4)).completion_tokens
    engine.stop()


def test_admin_routes_list_load_and_unload(registered):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tunesmith.serve.admin_routes import admin_router
    from tunesmith.serve.errors import install_error_handlers

    engine = ServingEngine.from_references(["orders@1"], serve_base=False, default_max_tokens=4)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(admin_router(engine))
    with TestClient(app) as http:
        listed = http.get("/admin/models").json()["data"]
        assert [(e["name"], e["engine_name"], e["registry_version"]) for e in listed] == [("orders@1", "orders@1", "1")]
        loaded = http.post("/admin/models", json={"model": "orders@2"})
        assert loaded.status_code == 200
        assert {e["name"] for e in loaded.json()["data"]} == {"orders@1", "orders@2"}
        bad = http.post("/admin/models", json={"model": "orders@nope"})
        assert bad.status_code == 400 and "no alias 'nope'" in bad.json()["error"]["message"]
        removed = http.delete("/admin/models/orders@2")
        assert removed.status_code == 200 and [e["name"] for e in removed.json()["data"]] == ["orders@1"]
        unknown = http.delete("/admin/models/orders@2")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    engine.stop()


def test_the_alias_watcher_reports_moves_and_stops(registered):
    from tunesmith.serve.hot_reload import start_alias_watcher

    registered.move_alias("orders", "staging", "1", "set", "test", {})
    engine = ServingEngine.from_references(["orders@staging"], serve_base=False, default_max_tokens=4)
    said = []
    stop = start_alias_watcher(engine, 0.05, said.append)
    try:
        registered.move_alias("orders", "staging", "2", "promote", "test", {})
        assert wait_until(lambda: said)
    finally:
        stop()
    assert said[0] == "orders@staging: now serves orders@2 (was orders@1)"
    with pytest.raises(TunesmithError, match="positive number of seconds"):
        start_alias_watcher(engine, 0)
    engine.stop()


def test_adapters_added_to_and_removed_from_a_stacked_base_answer_like_peft(runs):
    """Slots added at runtime (also one freed by the merged version) give every row peft's own logits."""
    import torch

    from tunesmith.generation.multi_lora import add_stacked_adapter, remove_stacked_adapter, stack_adapters
    from tunesmith.models import attach_adapter, load_model, load_with_adapter
    from tunesmith.registry.run import Run
    from tunesmith.serve.loading import _adapter_updates

    first, second = (Run.open(run) for run in runs)
    model, rows = stack_adapters(attach_adapter(load_model(first.base_source), first.weights_dir, "a"), ["a"],
                                 merge_first=True)
    ids = torch.tensor([[5, 6, 7, 8]] * 3)

    def logits(names):
        rows.select(names, ids.device)
        return model(input_ids=ids[:len(names)]).logits

    with torch.inference_mode():
        expected = {"a": load_with_adapter(first.base_source, first.weights_dir)(input_ids=ids[:1]).logits[0],
                    "b": load_with_adapter(second.base_source, second.weights_dir)(input_ids=ids[:1]).logits[0],
                    None: load_model(first.base_source)(input_ids=ids[:1]).logits[0]}
    updates, reason = _adapter_updates(model.config, _target(second))
    assert reason is None
    add_stacked_adapter(model, rows, "b", updates)
    with torch.inference_mode():
        mixed = logits(["a", "b", None])
    torch.testing.assert_close(mixed, torch.stack([expected["a"], expected["b"], expected[None]]), rtol=1e-4, atol=1e-4)
    remove_stacked_adapter(model, rows, "a")  # the merged one: its slot is reused, the base weights keep its update
    add_stacked_adapter(model, rows, "b-again", updates)
    assert rows.slot_of["b-again"] == 1
    with torch.inference_mode():
        again = logits(["b-again", None, "b"])
    torch.testing.assert_close(again, torch.stack([expected["b"], expected[None], expected["b"]]), rtol=1e-4, atol=1e-4)


def test_pickled_weights_are_refused_before_anything_unpickles_them(runs, tmp_path, tiny_model_dir, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from tunesmith.models import load_model, load_with_adapter
    from tunesmith.registry.run import Run

    pickled = Run.open(shutil.copytree(runs[0], tmp_path / "pickled"))
    adapter = pickled.weights_dir
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"not even a pickle")
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("a pickle was loaded"))

    message = (rf"{adapter} holds pickled weights \(adapter_model.bin\); tunesmith loads safetensors only: re-save it "
               r"with save_pretrained\(safe_serialization=True\)")
    with pytest.raises(TunesmithError, match=message):
        ServingEngine.from_references([str(pickled.directory)])
    with pytest.raises(TunesmithError, match=message):
        load_with_adapter(tiny_model_dir, adapter)
    with pytest.raises(TunesmithError, match=r"holds pickled weights \(pytorch_model.bin\)"):
        load_model(model_dir)


def _target(run):
    from tunesmith.serve.targets import ServedTarget

    return ServedTarget(run.name, run)
