"""Replay rows: general examples mixed into SFT training so the fine-tuned model keeps what it could already do.

`self_distill` asks the base model itself to answer tunesmith's shipped general prompts (`replay_prompts.jsonl`,
CC0) greedily: training on its own answers holds the model near its starting behaviour outside the task, needs no
outside data and works for any base model. Answers are generated once per base model and kept in tunesmith's cache;
later runs only generate prompts not answered yet. A data file of your own general chat examples works too.

Replay rows go to `data/replay.jsonl` beside the training split, never into the validation split, and do not change
the dataset hash: they are recorded in the manifest's `data.replay`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from importlib import resources
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.formats import read_examples
from tunesmith.data.template import end_of_turn_token_ids, template_fingerprint
from tunesmith.errors import TunesmithError
from tunesmith.models import tunesmith_home

REPLAY_FILE = "replay.jsonl"
GENERATION_BATCH = 16


def shipped_replay_prompts() -> list[str]:
    """The general prompts shipped with tunesmith for self-distillation."""
    text = resources.files("tunesmith.data").joinpath("replay_prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def write_replay(config: RunConfig, base_source, tokenizer, train_rows: int, data_dir: Path,
                 prompts: list[str] | None = None) -> dict | None:
    """Write `data_dir/replay.jsonl` (share x training rows) and return the manifest's `data.replay`; None when off."""
    replay = config.data.replay
    wanted = round(replay.share * train_rows)
    if not wanted:
        return None
    if replay.source == "self_distill":
        rows, details = _self_distilled(config, base_source, tokenizer, wanted, prompts or shipped_replay_prompts())
    else:
        rows, details = _from_file(Path(replay.source), wanted, config.seed)
    target = data_dir / REPLAY_FILE
    text = "".join(json.dumps({"messages": row}, ensure_ascii=False) + "\n" for row in rows)
    target.write_text(text, encoding="utf-8")
    return {"source": str(replay.source), "share": replay.share, "rows": len(rows), "file": f"data/{REPLAY_FILE}",
            "sha256": hashlib.sha256(text.encode()).hexdigest(), **details}


def read_replay(run) -> list:
    """The replay rows a prepare wrote for this run (none when it wrote none), hash-checked against the manifest."""
    section = run.manifest.data.replay
    if section is None or not section.rows:
        return []
    path = run.directory / section.file
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != section.sha256:
        raise TunesmithError(f"{path} is missing or differs from what prepare wrote (sha256 in the manifest's "
                             "data.replay); prepare the run again with --overwrite")
    return read_examples(path, "chat")


def _from_file(path: Path, wanted: int, seed: int) -> tuple[list[list[dict]], dict]:
    if not path.exists():
        raise TunesmithError(f"data.replay.source {path}: no such file; give a chat data file or `self_distill`")
    examples = read_examples(path, "chat")
    chosen = random.Random(seed).sample(examples, min(wanted, len(examples)))
    return [example.message_dicts() for example in chosen], {"available": len(examples)}


def _self_distilled(config: RunConfig, base_source, tokenizer, wanted: int, prompts: list[str]):
    """The base model's greedy answers to `wanted` seeded-random prompts; answers that run out of tokens are left out."""
    chosen = random.Random(config.seed).sample(prompts, min(wanted, len(prompts)))
    cache = _cache_file(base_source, tokenizer, config.data.replay.max_new_tokens)
    answers = _read_cache(cache)
    missing = [prompt for prompt in chosen if prompt not in answers]
    if missing:
        answers.update(_generate(base_source, tokenizer, missing, config.data.replay.max_new_tokens))
        _write_cache(cache, answers)
    rows = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": answers[prompt]["answer"]}]
            for prompt in chosen if answers[prompt]["stopped"] and answers[prompt]["answer"]]
    return rows, {"available": len(prompts), "generated_now": len(missing), "cut_answers_left_out": len(chosen) - len(rows),
                  "cache": str(cache)}


def _generate(base_source, tokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    from tunesmith.generation.batch_generate import generate_batched
    from tunesmith.models import load_model
    from tunesmith.progress_display import LoggedProgress

    model = load_model(base_source)
    with LoggedProgress(transient=True) as progress:
        task = progress.add_task(f"self-distillation: the base model answers {len(prompts)} general prompts (once)",
                                 total=len(prompts))
        outputs = generate_batched(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                   end_of_turn_token_ids(tokenizer), max_new_tokens, GENERATION_BATCH,
                                   on_batch=lambda n: progress.advance(task, n))
    return {prompt: {"answer": output.text, "stopped": output.stopped} for prompt, output in zip(prompts, outputs)}


def _cache_file(base_source, tokenizer, max_new_tokens: int) -> Path:
    """One cache per base model (its folder or Hub id and weight files' sizes), chat template and answer budget."""
    source = Path(str(base_source))
    weights = sorted((f.name, f.stat().st_size) for f in source.glob("*.safetensors")) if source.is_dir() else []
    key = json.dumps([str(base_source), weights, template_fingerprint(tokenizer), max_new_tokens])
    return tunesmith_home() / "replay" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.jsonl"


def _read_cache(path: Path) -> dict:
    if not path.exists():
        return {}
    answers = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            answers[row["prompt"]] = {"answer": row["answer"], "stopped": row["stopped"]}
        except (ValueError, KeyError, TypeError):
            continue  # a damaged cache line is regenerated, never trusted
    return answers


def _write_cache(path: Path, answers: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text("".join(json.dumps({"prompt": p, **a}, ensure_ascii=False) + "\n" for p, a in answers.items()),
                       encoding="utf-8")
    os.replace(staging, path)
