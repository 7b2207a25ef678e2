"""What the external engines (vLLM, llama.cpp's llama-server) share: which process serves which names on which
port, and running those processes as one server.

Versions trained as adapters on one base share one process that holds the base once; every fully fine-tuned
version is a whole model and gets a process of its own; with `base=True`, a base that no adapter brings along
gets one too. Processes take consecutive ports from the one asked for, in that order.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from tunesmith.errors import TunesmithError
from tunesmith.serve.targets import ServedTarget

STOP_GRACE_S = 30.0
"""How long a process may take to shut down after it is asked to, before it is killed."""
POLL_S = 0.2


@dataclass
class SharedBase:
    """A base model and the adapters served on it by one process."""

    key: str
    name: str
    source: str
    adapters: list[ServedTarget] = field(default_factory=list)


@dataclass
class ProcessPlan:
    """Every process to start, and the first port of each kind (`ports` lists them in start order)."""

    shared: list[SharedBase]
    full: list[ServedTarget]
    base_only: list[SharedBase]
    first_port: int

    def ports(self) -> list[int]:
        count = len(self.shared) + len(self.full) + len(self.base_only)
        return list(range(self.first_port, self.first_port + count))


def plan_processes(targets: list[ServedTarget], port: int, base: bool = True) -> ProcessPlan:
    """Group `targets` into processes; untrained runs and two processes answering to one name are refused."""
    shared: dict[str, SharedBase] = {}
    full: list[ServedTarget] = []
    bases: dict[str, SharedBase] = {}
    for target in targets:
        if not target.run.is_trained:
            raise TunesmithError(f"{target.name}: {target.run_dir} has not been trained yet; run "
                                 f"`tunesmith train {target.run_dir}` first")
        bases.setdefault(target.base_key, SharedBase(target.base_key, target.base_name, target.run.base_source))
        if target.is_adapter:
            shared.setdefault(target.base_key, SharedBase(target.base_key, target.base_name,
                                                         target.run.base_source)).adapters.append(target)
        else:
            full.append(target)
    base_only = [b for key, b in bases.items() if base and key not in shared]
    plan = ProcessPlan(list(shared.values()), full, base_only, port)
    _check_names_unique(plan)
    return plan


def _check_names_unique(plan: ProcessPlan) -> None:
    names = [b.name for b in plan.shared + plan.base_only]
    names += [a.name for b in plan.shared for a in b.adapters] + [t.name for t in plan.full]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            raise TunesmithError(f"two served models would both be called {name!r} (a version named like its base "
                                 "model, or two bases in folders of one name); register one under another name")


def supervise(commands: list[list[str]], grace_s: float = STOP_GRACE_S) -> int:
    """Run `commands` together as one server: SIGINT/SIGTERM are passed on to each, and when one exits the
    others are stopped. Returns the exit code of the first to exit (128 + N when signal N ended it)."""
    children: list[subprocess.Popen] = []

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for argv in commands:
            try:
                # Own session: a terminal's Ctrl-C reaches a child once, through `forward`, not twice.
                children.append(subprocess.Popen(argv, start_new_session=True))
            except OSError as exc:
                raise TunesmithError(f"could not start {argv[0]}: {exc.strerror or exc}") from None
        return _exit_code(_wait_for_first_exit(children).returncode)
    finally:
        _stop(children, grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_for_first_exit(children: list[subprocess.Popen]) -> subprocess.Popen:
    while True:
        for child in children:
            if child.poll() is not None:
                return child
        time.sleep(POLL_S)


def _stop(children: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM whatever still runs, then SIGKILL what has not exited after `grace_s`."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode
