"""What the gateway costs: `tunesmith serve` before the gateway existed (a git worktree of --before) against today's
with all of it on (an API key on every request, the request log with full content fsync'd per request, a traffic
route, Prometheus scraped every second), same run, same prompts, 16 streaming clients, rounds interleaved.

    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/gateway_overhead.py --run runs/quickstart

Prints tokens/s per round and the ratio of the sums (target: the gateway costs at most 5%).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import yaml
from serve_load import chat_prompts, old_checkout, running, timed_load



def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--before", default="417b464", help="the last commit without the gateway")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per server, interleaved")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--load-seconds", type=float, default=600)
    return parser.parse_args()


def gateway_config(run_dir: Path, scratch: Path) -> tuple[Path, str]:
    """A serve config with keys, a full request log and a route over the run; and a key for it."""
    from tunesmith.registry.run import Run
    from tunesmith.serve.gateway.keys import KeyStore

    _, key = KeyStore(scratch / "keys.sqlite").create("bench", rpm=100000, tpm=100000000)
    name = Run.open(run_dir).name
    config = scratch / "serve.yaml"
    config.write_text(yaml.safe_dump({"serve": {
        "models": [str(run_dir)], "keys_file": str(scratch / "keys.sqlite"), "request_log": str(scratch / "log"),
        "log_content": "full", "routes": {"bench-route": {"split": {name: 100}}}}}))
    return config, key


def scraping(url: str, key: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def one_round(label: str, command: list[str], names: list[str], prompts, args, log: Path, env=None,
              key: str | None = None) -> float:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    with running(label, command, log, env) as (url, _):
        timed_load(label + " warm-up", url, names, 2, prompts[:2], args, headers)
        stop = threading.Event()
        scraper = threading.Thread(target=scraping, args=(url, key, stop), daemon=True) if key else None
        if scraper:
            scraper.start()
        load = timed_load(label, url, names, args.clients, prompts[:args.requests], args, headers)
        stop.set()
        if load.error:
            raise SystemExit(f"{label}: {load.error}")
        return load.tokens_per_s


def main() -> None:
    from tunesmith.registry.run import Run

    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run_dir, prompts = args.run.resolve(), chat_prompts(args.run)
    serve = [sys.executable, "-m", "tunesmith", "serve"]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.clients} clients, {args.requests} requests per round, "
          f"max {args.max_tokens} tokens", flush=True)
    before, after = [], []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as scratch_name:
        scratch = Path(scratch_name)
        config, key = gateway_config(run_dir, scratch)
        with old_checkout(args.before, scratch / "before") as old_src:
            for index in range(args.rounds):
                before.append(one_round(f"no gateway ({args.before}) #{index + 1}", [*serve, str(run_dir)],
                                        [Run.open(run_dir).name], prompts, args, scratch / "before.log",
                                        env={"PYTHONPATH": str(old_src)}))
                after.append(one_round(f"gateway #{index + 1}", [*serve, "--config", str(config)], ["bench-route"],
                                       prompts, args, scratch / "after.log", key=key))
        logged = sum(1 for _ in (scratch / "log" / "requests.jsonl").open())
    ratio = sum(after) / sum(before)
    print(f"\nno gateway: {' '.join(f'{v:.1f}' for v in before)} tok/s; gateway: "
          f"{' '.join(f'{v:.1f}' for v in after)} tok/s; {logged} requests logged")
    print(f"gateway throughput / no gateway = {ratio:.3f} (overhead {100 * (1 - ratio):.1f}%; target <= 5%)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: servers stopped, worktree and scratch folder removed")
