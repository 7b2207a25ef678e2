"""How fast `tunesmith monitor` reads a big log: a synthetic 100k-request week (the traffic shifts to a new product
family on day 5) against 2,000 training rows, tokens counted with the default model's tokenizer, HTML + JSON +
Prometheus written; peak RSS of the monitoring process.

    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/monitor_speed.py

Prints seconds and peak RSS (targets: 60 s, 2 GiB), against reading the log alone in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tunesmith.models import default_model_dir

ITEMS, COLORS = ["mug", "lamp", "hat", "chair", "kettle"], ["red", "blue", "green", "black"]
CITIES = ["Denver", "Lisbon", "Osaka", "Oslo", "Lyon"]
NEW_ITEMS = ["graphics card", "laptop", "monitor", "keyboard"]  # the product family that arrives on day 5
SHIFT_DAY = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--training-rows", type=int, default=2000)
    parser.add_argument("--tokenizer", type=Path, help="model folder that counts tokens (default: the default model)")
    parser.add_argument("--keep", type=Path, help="write the log here and keep it (default: a temp folder)")
    return parser.parse_args()


def order_prompt(rng: random.Random, shifted: bool) -> str:
    if shifted:
        return (f"hi!! need {rng.randint(1, 4)}x {rng.choice(NEW_ITEMS)} w/ warranty + express shipping to "
                f"{rng.choice(CITIES)}, invoice for company account pls")
    return f"Please send {rng.randint(1, 9)} {rng.choice(COLORS)} {rng.choice(ITEMS)}s to {rng.choice(CITIES)}."


def write_training_data(path: Path, rows: int, rng: random.Random) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            answer = json.dumps({"item": rng.choice(ITEMS), "quantity": rng.randint(1, 9)})
            handle.write(json.dumps({"messages": [{"role": "user", "content": order_prompt(rng, False)},
                                                  {"role": "assistant", "content": answer}]}) + "\n")


def write_log(directory: Path, requests: int, days: int, rng: random.Random) -> None:
    """Lines in the request log writer's format (written directly: the writer fsyncs every record)."""
    directory.mkdir(parents=True, exist_ok=True)
    start = datetime.now(timezone.utc) - timedelta(days=days)
    step = days * 86400 / requests
    with (directory / "requests.jsonl").open("w", encoding="utf-8") as log, \
            (directory / "feedback.jsonl").open("w", encoding="utf-8") as feedback:
        for n in range(requests):
            moment = start + timedelta(seconds=n * step)
            shifted = (moment - start).days >= SHIFT_DAY and rng.random() < 0.7
            served = "orders@candidate" if rng.random() < 0.1 else "orders@production"
            failed = rng.random() < 0.01
            answer = json.dumps({"item": rng.choice(ITEMS), "quantity": rng.randint(1, 9)})
            record = {
                "version": 1, "id": f"chatcmpl-{n:08d}", "time": moment.isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"), "endpoint": "chat", "key_id": "k1", "key_name": "shop", "user": None,
                "model": "orders", "served": served, "registry_model": None, "registry_version": None,
                "route": "orders", "arm": served, "shadow": False,
                "messages": [{"role": "system", "content": "Extract the order as JSON."},
                             {"role": "user", "content": order_prompt(rng, shifted)}],
                "prompt": None, "answers": [] if failed else [answer], "prompt_tokens": 30, "completion_tokens": 14,
                "latency_s": round(rng.uniform(0.2, 1.5), 4), "ttft_s": round(rng.uniform(0.02, 0.2), 4),
                "finish_reason": None if failed else "stop", "status": 500 if failed else 200,
                "error": "engine failed" if failed else None, "json_valid": None, "content": "full"}
            log.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            if n % 50 == 0:
                feedback.write(json.dumps({
                    "version": 1, "id": f"fb-{n}", "time": record["time"], "completion_id": record["id"],
                    "rating": rng.choice(["positive", "positive", "negative", "neutral"])}) + "\n")


MONITOR = """
import sys, time
from pathlib import Path
from tunesmith.monitor.report import write_html, write_json, write_prometheus
from tunesmith.monitor.run import monitor
folder = Path(sys.argv[1])
started = time.perf_counter()
tokenizer = Path(sys.argv[2]) if len(sys.argv) > 2 else None
report = monitor("orders", "8d", "1d", folder / "log", folder / "train.jsonl", tokenizer=tokenizer)
write_json(report, folder / "report.json"); write_html(report, folder / "report.html")
write_prometheus(report, folder / "report.prom")
print(time.perf_counter() - started, report.drift.summary, report.drift.drift_starts, report.drift.token_unit,
      sep="\\t")
"""
READ_ALONE = """
import sys, time
from pathlib import Path
from tunesmith.request_log import read_request_log
started = time.perf_counter()
count = sum(1 for _ in read_request_log(Path(sys.argv[1]) / "log"))
print(time.perf_counter() - started, count, sep="\\t")
"""


def child(code: str, *args) -> list[str]:
    """Run `code` in a fresh interpreter; its tab-separated output fields."""
    output = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True)
    return output.stdout.strip().split("\t")


def main() -> None:
    args = parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="monitor-bench-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        write_training_data(folder / "train.jsonl", args.training_rows, rng)
        write_log(folder / "log", args.requests, args.days, rng)
        print(f"wrote {args.requests:,} requests in {time.perf_counter() - started:.1f} s to {folder}")
        tokenizer = args.tokenizer or default_model_dir()
        if not tokenizer.is_dir():
            sys.exit(f"no tokenizer folder at {tokenizer}; run `tunesmith fetch-model` or pass --tokenizer")
        monitor_seconds, summary, starts, unit = child(MONITOR, folder, tokenizer)
        # The first child's peak: RUSAGE_CHILDREN keeps the largest of all children, and monitoring comes first.
        monitor_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        read_seconds, count = child(READ_ALONE, folder)
        print(f"monitor: {float(monitor_seconds):.1f} s, peak RSS {monitor_rss:.2f} GiB (targets: 60 s, 2 GiB)")
        print(f"reading the {int(count):,} records alone: {float(read_seconds):.1f} s "
              f"(monitor takes {float(monitor_seconds) / float(read_seconds):.1f}x that)")
        print(f"{summary}, {unit}; drift starts {starts} (the shift begins on day {SHIFT_DAY + 1})")


if __name__ == "__main__":
    main()
