"""Load benchmark of OpenAI-compatible chat servers: `tunesmith serve` against the old server and other engines.

C clients (default 16) send quickstart-style prompts back to back, streaming, greedy, up to 64 new tokens each.
Baselines in the same invocation: the old one-at-a-time `tunesmith serve` (a git worktree of --old-commit),
`transformers serve --continuous-batching` on the merged model (its fp32 weights, and in bf16), and llama.cpp's
`llama-server` (f16 GGUF, 16 slots, 2 threads) when a binary is found. tunesmith runs at its default precision (auto:
bf16 on CPUs with bf16 instructions) and, as "tunesmith fp32", at the old server's. Each row prints output tokens/s
and its ratio to the old server, p50/p99 latency, p50 time to first token and the share of answers identical to the old server's one-at-a-time greedy answers; then
the 4-adapter throughput as a ratio of the single-adapter one, and the server's RSS with 1 vs 4 adapters (once loaded,
and after serving). `--compare-commit C` adds tunesmith as of commit C (1 adapter and 4, from a git worktree), so a
change to the engine is measured against its parent in the same invocation.
Run (under the shared bench lock), after `tunesmith run examples/quickstart/config.yaml`:
    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/serve_load.py --run runs/quickstart
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("old", "new", "new-fp32", "adapters", "transformers", "transformers-bf16", "llama")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PLAIN_OUTPUT = {"NO_COLOR": "1", "COLUMNS": "200"}  # servers' error messages stay readable in our one-line report
BOX_DRAWING = dict.fromkeys(range(0x2500, 0x2580))


class ServerFailed(Exception):
    """The server exited or never answered /health; the message is the tail of its log."""


@dataclass
class Answer:
    index: int
    started: float
    first_token: float | None = None
    ended: float = 0.0
    tokens: int = 0
    text: str = ""
    error: str | None = None
    usage_missing: bool = False


@dataclass
class Load:
    engine: str
    clients: int
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    load_average: float | None = None  # the machine's 1-minute load right after: this machine is shared and noisy

    @property
    def answered(self) -> list[Answer]:
        return [a for a in self.answers if a.error is None]

    @property
    def tokens_per_s(self) -> float:
        return sum(a.tokens for a in self.answered) / self.seconds if self.seconds else 0.0


def chat_prompts(run_dir: Path) -> list[list[dict]]:
    """The run's held-out conversations, then its training ones, each cut before its last assistant message."""
    prompts = []
    for split in ("validation", "train"):
        for line in (run_dir / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["messages"] if line.strip() else []
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
            if last:
                prompts.append(messages[:last])
    return prompts


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (no interpolation: with few requests p99 is the slowest one)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log_path: Path, lines: int = 6, chars: int = 400) -> str:
    """The end of a server's log as one line: box drawing (rich error panels) and progress bars left out."""
    cleaned = (line.translate(BOX_DRAWING).strip() for line in log_path.read_text(errors="replace").splitlines())
    kept = [line for line in cleaned if line and "it/s]" not in line]
    return " ".join(kept[-lines:])[-chars:] or "(no output)"


def wait_ready(process: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"exited with {process.returncode}: {log_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise ServerFailed(f"no answer on {url}/health within {timeout:.0f} s: {log_tail(log_path)}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (workers included), SIGKILL if it lingers."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def running(engine: str, command: list[str], log_path: Path, env: dict | None = None, timeout: float = 600):
    """Start a server (its own session, so Ctrl-C reaches only us and we stop it) on a free port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, **PLAIN_OUTPUT, **(env or {})},
                                   start_new_session=True)
        try:
            started = time.perf_counter()
            wait_ready(process, url, log_path, timeout)
            print(f"  {engine}: server ready in {time.perf_counter() - started:.0f} s", flush=True)
            yield url, process.pid
        finally:
            stop(process)


def rss_mib(pid: int) -> float:
    """Resident memory of the process and its children (psutil), else of the process alone (/proc)."""
    try:
        import psutil
    except ImportError:
        status = Path(f"/proc/{pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


async def read_stream(response: httpx.Response, answer: Answer) -> int:
    """Fill `answer` from the server-sent events; the number of content chunks."""
    chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line.strip() == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        if "error" in chunk:  # an error after the 200 status line travels as an event
            answer.error = str(chunk["error"].get("message", chunk["error"]))[:300]
        for choice in chunk.get("choices") or []:
            if text := (choice.get("delta") or {}).get("content"):
                answer.first_token = answer.first_token or time.perf_counter()
                answer.text += text
                chunks += 1
        if chunk.get("usage"):
            answer.tokens = chunk["usage"]["completion_tokens"]
    return chunks


async def ask(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int,
              index: int) -> Answer:
    """One streamed greedy chat completion, timed; token count from the usage chunk (else one per chunk)."""
    answer = Answer(index, time.perf_counter())
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                body_text = (await response.aread()).decode(errors="replace")
                answer.error = f"HTTP {response.status_code}: {body_text[:300]}"
            else:
                chunks = await read_stream(response, answer)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    answer.ended = time.perf_counter()
    if not answer.tokens:
        answer.tokens, answer.usage_missing = chunks, True
    return answer


async def drive(url: str, models: list[str], prompts: list[list[dict]], clients: int, max_tokens: int,
                time_limit: float, headers: dict | None = None) -> tuple[list[Answer], float]:
    """`clients` loops each take the next prompt as soon as their last answer is in; none starts after `time_limit`.
    Request i goes to models[i % len(models)]; wall time runs from the first request to the last answer."""
    pending, answers = iter(range(len(prompts))), []
    # A fresh connection per request: llama-server (cpp-httplib) closes a kept-alive one after 5 requests, and a
    # request racing that close fails; on localhost a connection costs well under a millisecond.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits, headers=headers) as client:
        started = time.perf_counter()
        deadline = started + time_limit

        async def one_client() -> None:
            for index in pending:  # shared iterator: every prompt is sent once, by whichever client is free
                if time.perf_counter() > deadline:
                    return
                answers.append(await ask(client, url, models[index % len(models)], prompts[index], max_tokens, index))

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return sorted(answers, key=lambda a: a.index), max((a.ended for a in answers), default=started) - started


def timed_load(engine: str, url: str, names: list[str], clients: int, prompts: list[list[dict]], args,
               headers: dict | None = None) -> Load:
    load = Load(engine, clients)
    load.answers, load.seconds = asyncio.run(drive(url, names, prompts, clients, args.max_tokens, args.load_seconds,
                                                   headers))
    load.load_average = round(os.getloadavg()[0], 2)
    if failed := [a for a in load.answers if a.error]:
        load.error = f"{len(failed)}/{len(load.answers)} failed, first: {failed[0].error}"
    print(f"  {engine}, {clients} clients: {len(load.answered)} answers, {load.tokens_per_s:.1f} tok/s, "
          f"load average {load.load_average:.1f}"
          + (f"  ({load.error})" if load.error else ""), flush=True)
    return load


def measure(engine: str, command: list[str], loads: list[tuple[int, int]], prompts: list[list[dict]], args,
            log_path: Path, models: list[str] | None = None,
            env: dict | None = None) -> tuple[list[Load], tuple[float, float] | None]:
    """Start the server and run each (clients, requests) load on it in turn; the loads, and its RSS (MiB) once
    loaded and after the last load. A server that fails to start or to answer is reported in every row instead of
    raising."""
    try:
        with running(engine, command, log_path, env) as (url, pid):
            # Without names given, the first one /v1/models lists: tunesmith lists the adapter before the base.
            names = models or [card["id"] for card in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]][:1]
            loaded = rss_mib(pid)
            warm_up, _ = asyncio.run(drive(url, names, [prompts[0]] * len(names), 1, 4, 600))  # one per name
            if failed := [a for a in warm_up if a.error]:
                raise ServerFailed(f"warm-up failed: {names[failed[0].index]}: {failed[0].error}")
            results = [timed_load(engine, url, names, clients, prompts[:requests], args) for clients, requests in loads]
            return results, (loaded, rss_mib(pid))
    except (ServerFailed, httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        print(f"  {engine}: FAILED: {exc}", flush=True)
        return [Load(engine, clients, error=str(exc)) for clients, _ in loads], None


@contextmanager
def old_checkout(commit: str, target: Path):
    """A detached git worktree of the old server's commit; its src/ goes on PYTHONPATH. Removed afterwards."""
    added = subprocess.run(["git", "worktree", "add", "--detach", str(target), commit], cwd=ROOT,
                           capture_output=True, text=True)
    if added.returncode:
        raise SystemExit(f"git worktree add {commit} failed: {added.stderr.strip()}; pass another --old-commit "
                         "(or --engines without old) or --compare-commit")
    try:
        yield target / "src"
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(target)], cwd=ROOT, capture_output=True)


OLD_CONFIG_FILTER = """
import sys, yaml
from pydantic import BaseModel
from tunesmith.config import RunConfig

def known(model, values):
    kept = {}
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        inner = field.annotation
        nested = isinstance(inner, type) and issubclass(inner, BaseModel) and isinstance(value, dict)
        kept[key] = known(inner, value) if nested else value
    return kept

print(yaml.safe_dump(known(RunConfig, yaml.safe_load(sys.stdin.read()))))
"""


def old_run_dir(run_dir: Path, old_src: Path, target: Path) -> Path:
    """The run as the old commit can read it: links to every file, and a config.yaml without the options added
    since (the old server refuses options it does not know)."""
    target.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name != "config.yaml":
            (target / entry.name).symlink_to(entry.resolve())
    kept = subprocess.run([sys.executable, "-c", OLD_CONFIG_FILTER], input=(run_dir / "config.yaml").read_text(),
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(old_src)})
    if kept.returncode:
        raise SystemExit(f"could not reduce the run's config to the old commit's options: {kept.stderr[-300:]}")
    (target / "config.yaml").write_text(kept.stdout)
    return target


def adapter_copies(run_dir: Path, scratch: Path, count: int) -> list[Path]:
    """The run plus count-1 copies under other names: the same weights, but separate adapters to the server."""
    from tunesmith.registry.run import Run

    name = Run.open(run_dir).name
    copies = [run_dir.resolve()]
    for number in range(2, count + 1):
        target = scratch / f"{name}-{number}"
        shutil.copytree(run_dir, target)
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["name"] = f"{name}-{number}"
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
        copies.append(target)
    return copies


def merged_folder(run_dir: Path, target: Path) -> Path:
    """Base + adapter merged (peft `merge_and_unload`), fp32, with the adapter's tokenizer and chat template."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from tunesmith.registry.run import Run

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    run = Run.open(run_dir)
    with warnings.catch_warnings():  # deprecation chatter from peft/transformers internals
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(run.base_source, dtype=torch.float32)
        PeftModel.from_pretrained(base, str(run.weights_dir)).merge_and_unload().save_pretrained(target)
    AutoTokenizer.from_pretrained(run.weights_dir).save_pretrained(target)
    return target


def bench_llama_server(binary: str | None, merged: Path, scratch: Path, prompts, args) -> list[Load]:
    binary = binary or shutil.which("llama-server")
    if not binary:
        print("  llama-server: skipped, no binary (pass --llama-server PATH or put llama-server on PATH)", flush=True)
        return []
    from tunesmith.registry.gguf_export import write_gguf

    gguf = scratch / "merged-f16.gguf"
    write_gguf(merged, gguf, "f16")
    slot_context = 256 + args.max_tokens  # quickstart prompts are ~100 tokens
    command = [binary, "-m", str(gguf), "-np", str(args.clients), "-t", "2", "-c", str(slot_context * args.clients)]
    return measure("llama-server f16", command, [(args.clients, args.requests)], prompts, args,
                   scratch / "llama-server.log", models=["merged-f16"])[0]


def row_values(load: Load, old_tok_s: float | None, reference: dict[int, str] | None) -> dict:
    latencies = [a.ended - a.started for a in load.answered]
    ttfts = [a.first_token - a.started for a in load.answered if a.first_token]
    shared = [a for a in load.answered if reference and a.index in reference]
    return {"engine": load.engine, "clients": load.clients, "requests": len(load.answers),
            "answered": len(load.answered), "completion_tokens": sum(a.tokens for a in load.answered),
            "seconds": round(load.seconds, 2), "tokens_per_s": round(load.tokens_per_s, 2),
            "ratio_to_old": round(load.tokens_per_s / old_tok_s, 2) if old_tok_s and load.answered else None,
            "p50_latency_s": percentile(latencies, 0.5), "p99_latency_s": percentile(latencies, 0.99),
            "p50_ttft_s": percentile(ttfts, 0.5),
            "identical_share": sum(a.text == reference[a.index] for a in shared) / len(shared) if shared else None,
            "identical_compared": len(shared), "tokens_counted_as_chunks": any(a.usage_missing for a in load.answered),
            "load_average": load.load_average, "error": load.error}


def print_table(rows: list[dict]) -> None:
    def show(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    print(f"\n{'engine':<30} {'clients':>7} {'answers':>7} {'tok/s':>7} {'x old':>6} {'p50 s':>6} {'p99 s':>6} "
          f"{'TTFT50':>6} {'identical':>9} {'load':>5}")
    for row in rows:
        identical = f"{show(row['identical_share'], '.0%')}/{row['identical_compared']}"
        print(f"{row['engine']:<30} {row['clients']:>7} {row['answered']:>7} {row['tokens_per_s']:>7.1f} "
              f"{show(row['ratio_to_old'], '.2f'):>6} {show(row['p50_latency_s'], '.2f'):>6} "
              f"{show(row['p99_latency_s'], '.2f'):>6} {show(row['p50_ttft_s'], '.2f'):>6} {identical:>9} "
              f"{show(row['load_average'], '.1f'):>5}"
              + ("  (tokens counted as chunks)" if row["tokens_counted_as_chunks"] else "")
              + (f"  FAILED: {row['error']}" if row["error"] else ""))


def report(loads: list[Load], rss: dict[int, tuple[float, float] | None], args) -> None:
    old = next((load for load in loads if load.engine.startswith("old") and load.clients > 1), None)
    reference = {a.index: a.text for a in old.answered} if old else None
    rows = [row_values(load, old.tokens_per_s if old else None, reference) for load in loads]
    print_table(rows)
    print("identical: share of answers equal to the old server's one-at-a-time greedy answer (same prompt), "
          "over the requests both answered; load: the machine's 1-minute load average right after the row")
    summary = {"rows": rows, "rss_mib": {str(k): v for k, v in rss.items()}}
    single, mixed = (next((r for r in rows if r["engine"] == name and r["clients"] > 1), None)
                     for name in ("tunesmith", "tunesmith 4 adapters"))
    if single and mixed and single["answered"] and mixed["answered"] and not mixed["error"]:
        summary["four_adapters_ratio"] = round(mixed["tokens_per_s"] / single["tokens_per_s"], 2)
        print(f"RATIO 4 adapters / 1 adapter throughput = {summary['four_adapters_ratio']:.2f}x")
    if args.compare_commit:
        for name in ("tunesmith", "tunesmith 4 adapters"):
            now = next((r for r in rows if r["engine"] == name and r["clients"] > 1), None)
            earlier_name = name.replace("tunesmith", f"tunesmith @{args.compare_commit}")
            earlier = next((r for r in rows if r["engine"] == earlier_name), None)
            if now and earlier and now["answered"] and earlier["answered"]:
                print(f"RATIO {name} / {earlier_name} = {now['tokens_per_s'] / earlier['tokens_per_s']:.2f}x")
    for count, mib in rss.items():
        print(f"RSS tunesmith server, {count} adapter(s): " +
              (f"{mib[0]:.0f} MiB loaded, {mib[1]:.0f} MiB after serving" if mib else "- (server failed)"))
    if rss.get(1) and rss.get(4):
        summary["rss_mib_per_added_adapter"] = [round((rss[4][i] - rss[1][i]) / 3, 1) for i in (0, 1)]
        loaded, served = summary["rss_mib_per_added_adapter"]
        print(f"RSS per added adapter: {loaded:+.1f} MiB loaded, {served:+.1f} MiB after serving")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, **summary}, indent=2))
        print(f"wrote {args.json}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrent load (total)")
    parser.add_argument("--old-requests", type=int, default=32, help="requests for the old server's concurrent load")
    parser.add_argument("--single-requests", type=int, default=8, help="requests for the 1-client rows")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--load-seconds", type=float, default=180, help="no new request starts after this")
    parser.add_argument("--old-commit", default="0df37e4", help="the one-at-a-time server's commit")
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: from PATH)")
    parser.add_argument("--engines", nargs="*", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--compare-commit", default=None,
                        help="also run tunesmith of this commit (1 adapter and 4), to measure a change in one invocation")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser.parse_args()


def bench_tunesmith(args, prompts: list[list[dict]], scratch: Path) -> tuple[list[Load], dict[int, tuple | None]]:
    """The old server (a worktree of --old-commit), the new one with 1 adapter, then with 4; RSS by adapter count."""
    serve, run_dir = [sys.executable, "-m", "tunesmith", "serve"], args.run.resolve()
    concurrent, single = (args.clients, args.requests), (1, args.single_requests)
    loads, rss = [], {}
    if "old" in args.engines:
        with old_checkout(args.old_commit, scratch / "old-worktree") as old_src:
            old_run = old_run_dir(run_dir, old_src, scratch / "old-run")
            loads += measure("old one-at-a-time", [*serve, str(old_run)], [single, (args.clients, args.old_requests)],
                             prompts, args, scratch / "old.log", env={"PYTHONPATH": str(old_src)})[0]
    if "new" in args.engines:
        found, rss[1] = measure("tunesmith", [*serve, str(run_dir)], [single, concurrent], prompts, args,
                                scratch / "new.log")
        loads += found
    if "new-fp32" in args.engines:  # serve.precision auto picks bf16 on CPUs with bf16 instructions
        fp32 = scratch / "fp32.yaml"
        fp32.write_text(json.dumps({"serve": {"precision": "fp32"}}))  # JSON is YAML
        loads += measure("tunesmith fp32", [*serve, "--config", str(fp32), str(run_dir)], [concurrent], prompts, args,
                         scratch / "fp32.log")[0]
    if "adapters" in args.engines:
        from tunesmith.registry.run import Run

        runs = adapter_copies(args.run, scratch, 4)
        found, rss[4] = measure("tunesmith 4 adapters", [*serve, *map(str, runs)], [concurrent], prompts, args,
                                scratch / "adapters.log", models=[Run.open(r).name for r in runs])
        loads += found
    if args.compare_commit:
        loads += bench_earlier_commit(args, prompts, scratch)
    return loads, rss


def bench_earlier_commit(args, prompts: list[list[dict]], scratch: Path) -> list[Load]:
    """tunesmith as of --compare-commit (a worktree), with 1 adapter and with 4, after the current rows."""
    from tunesmith.registry.run import Run

    serve, label = [sys.executable, "-m", "tunesmith", "serve"], f"tunesmith @{args.compare_commit}"
    loads = []
    with old_checkout(args.compare_commit, scratch / "earlier-worktree") as earlier_src:
        env = {"PYTHONPATH": str(earlier_src)}
        runs = [old_run_dir(run, earlier_src, scratch / f"earlier-run-{n}")
                for n, run in enumerate(adapter_copies(args.run, scratch / "earlier-copies", 4))]
        names = [Run.open(run).name for run in runs]
        loads += measure(label, [*serve, str(runs[0])], [(args.clients, args.requests)], prompts, args,
                         scratch / "earlier.log", env=env)[0]
        loads += measure(f"{label} 4 adapters", [*serve, *map(str, runs)], [(args.clients, args.requests)], prompts,
                         args, scratch / "earlier-adapters.log", models=names, env=env)[0]
    return loads


def bench_baselines(args, prompts: list[list[dict]], scratch: Path) -> list[Load]:
    """`transformers serve --continuous-batching` and llama-server, both on the merged model."""
    if not {"transformers", "transformers-bf16", "llama"} & set(args.engines):
        return []
    loads, merged = [], merged_folder(args.run, scratch / "merged")
    # The merged model's own fp32 weights, and the same in bf16, as tunesmith serves them where bf16 is native.
    for engine, label, extra in (("transformers", "transformers serve CB", []),
                                 ("transformers-bf16", "transformers serve CB bf16", ["--dtype", "bfloat16"])):
        if engine in args.engines:
            command = [str(Path(sys.executable).parent / "transformers"), "serve", str(merged),
                       "--continuous-batching", *extra]
            loads += measure(label, command, [(args.clients, args.requests)], prompts, args,
                             scratch / f"{engine}.log", models=[str(merged)], env=OFFLINE)[0]
    if "llama" in args.engines:
        loads += bench_llama_server(args.llama_server, merged, scratch, prompts, args)
    return loads


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill stops the servers too, like Ctrl-C
    prompts = chat_prompts(args.run)
    print(f"load average {os.getloadavg()[0]:.2f}; {len(prompts)} prompts from {args.run}, greedy, "
          f"max {args.max_tokens} tokens, {args.clients} clients", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch_name:
        loads, rss = bench_tunesmith(args, prompts, Path(scratch_name))
        loads += bench_baselines(args, prompts, Path(scratch_name))
    report(loads, rss, args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: servers stopped, old-server worktree and scratch folder removed")
