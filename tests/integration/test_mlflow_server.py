"""An MLflow tracking server on loopback holds tunesmith's versions: what `mlflow ui` shows is read back over its
REST API (runs, loss curves, params, model versions, aliases), and a server that goes away is one clear error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tunesmith.errors import TunesmithError

from conftest import make_trained_run

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", (tmp_path / "artifacts").as_uri()],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.5)
    try:
        yield url, server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


def test_versions_curves_and_aliases_are_visible_through_the_mlflow_server(mlflow_server, tmp_path, tiny_model_dir,
                                                                           monkeypatch):
    from tunesmith.registry.register import register_run
    from tunesmith.registry.run import Run
    from tunesmith.registry.store import Registry

    url, server = mlflow_server
    run_dir = make_trained_run(tmp_path / "work", tiny_model_dir, "orders", seed=0, steps=4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    registry = Registry()
    info, created = register_run(registry, run_dir, "orders")
    registry.move_alias("orders", "production", info.version, "promote", "first release", {})
    assert created and registry.resolve("models:/orders@production") == ("orders", "1")

    api = f"{url}/api/2.0/mlflow"
    model = httpx.get(f"{api}/registered-models/get", params={"name": "orders"}).json()["registered_model"]
    assert {"alias": "production", "version": "1"} in model["aliases"]
    version = httpx.get(f"{api}/model-versions/get", params={"name": "orders", "version": "1"}).json()["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["tunesmith.content_id"] == info.lineage.content_id and tags["tunesmith.complete"] == "true"
    run_id = version["run_id"]
    params = {p["key"]: p["value"] for p in httpx.get(f"{api}/runs/get", params={"run_id": run_id}).json()["run"]["data"]["params"]}
    assert params["train.lora.r"] == "4" and params["data_hash"] == Run.open(run_dir).manifest.data.dataset_hash
    history = httpx.get(f"{api}/metrics/get-history", params={"run_id": run_id, "metric_key": "train_loss"}).json()
    assert [m["step"] for m in history["metrics"]] == [p.step for p in Run.open(run_dir).trained.loss_curve]
    artifacts = httpx.get(f"{api}/artifacts/list", params={"run_id": run_id}).json()["files"]
    assert {"run", "tunesmith", "README.md"} <= {a["path"] for a in artifacts}
    # The version's files come back through the server's artifact proxy, verified against their hashes.
    assert (registry.local_copy("orders", "1") / "adapter" / "adapter_config.json").is_file()

    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    with pytest.raises(TunesmithError, match="unreachable"):
        Registry()
