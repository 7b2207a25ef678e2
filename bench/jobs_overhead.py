"""What the OpenAI fine-tuning API path costs over `tunesmith run` with the same settings, and how long a user waits
from creating a job to the first chat answer of its model.

    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/jobs_overhead.py

Same data (the quickstart's orders), same run config: the one `jobs.config_mapping.run_config_for` makes for the
job, written as YAML and given to `tunesmith run` (registering too, as a job does). Then the same job through
`tunesmith serve` with the official `openai` client: upload, create, poll to `succeeded`, first chat answer.
Both in a scratch tunesmith home that shares the converted default model. Prints both wall times and the ratio
(target: the API path within 10%).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import yaml
from serve_load import running

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "examples/quickstart/orders.jsonl")
    parser.add_argument("--rows", type=int, default=200, help="the first N rows of --data (all: 0)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--serve", type=Path, default=ROOT / "runs/quickstart", help="a run the server serves")
    return parser.parse_args()


def scratch_home(scratch: Path) -> dict:
    """A fresh tunesmith home (registry, jobs) that reuses the converted default model."""
    from tunesmith.models import tunesmith_home

    home = scratch / "home"
    home.mkdir()
    (home / "models").symlink_to(tunesmith_home() / "models")
    return {**os.environ, "TUNESMITH_HOME": str(home), "NO_COLOR": "1"}


def direct_run(args, scratch: Path, env: dict) -> float:
    """`tunesmith run` on the job's own run config; wall seconds."""
    from tunesmith.jobs.config_mapping import run_config_for
    from tunesmith.jobs.records import Hyperparameters, JobSpec

    spec = JobSpec(job_id="ftjob-direct", owner=None, owner_name=None, model="SmolLM2-135M-Instruct",
                   base_model="default", training_file=str(args.data.resolve()), fine_tuned_model="direct",
                   hyperparameters=Hyperparameters(n_epochs=args.epochs, batch_size=args.batch_size), seed=0)
    config = run_config_for(spec, scratch / "direct").model_dump(mode="json")
    config["registry"] = {"name": "direct"}
    path = scratch / "direct.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tunesmith", "run", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"tunesmith run failed: {done.stderr[-2000:]}")
    print(f"  tunesmith run: {seconds:.0f} s", flush=True)
    return seconds


def api_run(args, scratch: Path, env: dict) -> tuple[float, float]:
    """Upload -> job -> succeeded -> first chat answer through the server; (seconds to succeeded, to answer)."""
    config = scratch / "serve.yaml"
    config.write_text(yaml.safe_dump({"serve": {"reload_seconds": 0}}), encoding="utf-8")
    command = [sys.executable, "-m", "tunesmith", "serve", str(args.serve), "--config", str(config)]
    os.environ["TUNESMITH_HOME"] = env["TUNESMITH_HOME"]  # the server subprocess and our key store agree
    with running("tunesmith serve", command, scratch / "serve.log", env) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        started = time.perf_counter()
        with args.data.open("rb") as data:
            upload = client.files.create(file=(args.data.name, data), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="SmolLM2-135M-Instruct", training_file=upload.id, seed=0, suffix="bench",
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": args.epochs, "batch_size": args.batch_size}}})
        while job.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
            job = client.fine_tuning.jobs.retrieve(job.id)
        succeeded = time.perf_counter() - started
        if job.status != "succeeded":
            raise SystemExit(f"the job ended {job.status}: {job.error}")
        client.chat.completions.create(model=job.fine_tuned_model, max_tokens=32,
                                       messages=[{"role": "user", "content": "Send 2 red mugs to Oslo"}])
        answered = time.perf_counter() - started
    print(f"  API: succeeded after {succeeded:.0f} s, first chat answer after {answered:.0f} s", flush=True)
    return succeeded, answered


def main() -> None:
    args = parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.data.name} ({args.rows or 'all'} rows), {args.epochs} "
          f"epoch(s), batch {args.batch_size}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as scratch_name:
        scratch = Path(scratch_name)
        env = scratch_home(scratch)
        if args.rows:
            lines = args.data.read_text(encoding="utf-8").splitlines(keepends=True)[:args.rows]
            args.data = scratch / args.data.name
            args.data.write_text("".join(lines), encoding="utf-8")
        direct = direct_run(args, scratch, env)
        succeeded, answered = api_run(args, scratch, env)
    print(f"\nAPI path to succeeded / tunesmith run = {succeeded / direct:.3f} (target <= 1.10); "
          f"job creation to first chat answer: {answered:.0f} s")


if __name__ == "__main__":
    main()
