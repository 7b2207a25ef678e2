"""`tunesmith serve` refuses what it cannot serve before any model loads (which takes half a minute on a real
model): a port out of range or taken, a run not trained yet unless --base asks for its base."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from tunesmith.cli.serve_command import serve_command
from tunesmith.errors import TunesmithError


class Loading(Exception):
    """Raised where the models would load: a call that raises it got past every check."""


@pytest.fixture
def no_loading(monkeypatch):
    from tunesmith.serve.engine import ServingEngine

    def load(*args, **kwargs):
        raise Loading()

    monkeypatch.setattr(ServingEngine, "from_targets", load)
    monkeypatch.setattr("tunesmith.serve.app.set_cpu_threads", lambda threads: 1)  # the test process keeps its own


@pytest.fixture
def trained_run(two_versions):
    return str(two_versions[0])


def serve(reference: str, port: int | None = None, base: bool | None = None) -> int:
    return serve_command([reference], config=None, base=base, engine=None, host=None, port=port)


@pytest.mark.parametrize("port", [0, -1, 65536, 99999])
def test_a_port_out_of_range_is_refused_before_loading(trained_run, no_loading, port):
    with pytest.raises(TunesmithError, match=f"port {port} is out of range: pass --port .* from 1 to 65535"):
        serve(trained_run, port)


def test_a_taken_port_is_one_clear_line_before_loading(trained_run, no_loading):
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        with pytest.raises(TunesmithError) as caught:
            serve(trained_run, port)
    assert str(caught.value) == f"port {port} on 127.0.0.1 is already in use: stop the other server or pass --port N"
    with pytest.raises(Loading):  # the port is free again: the checks pass and the models would load
        serve(trained_run, port)


def test_an_address_of_another_machine_is_refused():
    from tunesmith.serve.app import check_can_listen

    with pytest.raises(TunesmithError, match="cannot listen on 192.0.2.1:8000 .*pass --host"):
        check_can_listen("192.0.2.1", 8000)  # TEST-NET-1: never an address of this machine


def test_the_audited_command_exits_with_one_line_and_no_traceback(trained_run):
    done = subprocess.run([sys.executable, "-m", "tunesmith", "serve", trained_run, "--port", "99999"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "port 99999 is out of range" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Serving" not in done.stdout


def test_an_untrained_run_is_refused_unless_base_asks_for_its_base(tiny_config, no_loading):
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare

    untrained = str(prepare(load_config(tiny_config)))
    for base in (None, False):
        expected = f"{untrained} has not been trained yet; run `tunesmith train {untrained}` first, or pass --base"
        with pytest.raises(TunesmithError, match=re.escape(expected)):
            serve(untrained, base=base)
    with pytest.raises(Loading):  # --base: its base model is served alone, as before
        serve(untrained, base=True)
