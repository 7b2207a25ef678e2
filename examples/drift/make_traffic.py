"""Simulate a week of production traffic for the quickstart task (orders -> JSON), with drift from day 4 on.

Days 1-3 customers write the way the quickstart data does. From day 4 a wholesale channel joins: its orders
count in dozens and pairs ("two dozen teal chargers") and name an electronics family the quickstart never saw.
Each request and its answer is appended to a request log exactly as `tunesmith serve` writes it
(`RequestLogWriter`, PII redacted), and callers' verdicts go to `feedback.jsonl` beside it: most wrong answers
get a correction (the true order), some right ones a thumbs-up.

Answers come from the served version when `--answers model` (default when a version is registered: the model
behind `--served`, e.g. orders@production, generates every answer greedily), else they are synthesized: right on
familiar text, with the mistakes a small model makes on the shifted text (a dozen read as 1, plurals kept).

Run: python examples/drift/make_traffic.py [--log-dir examples/drift/requests] [--answers synthetic] [--tiny]
`--tiny` first trains the quickstart on the tiny test model (seconds) and registers it as orders@production when
nothing holds that alias yet, and synthesizes the answers (the tiny model's own are noise).
Seeded: the same requests come out every time (times are relative to now, so `--since 7d` covers them).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "quickstart"))
from make_data import CITIES, COLORS, NUMBER_WORDS, SYSTEM, make_row, plural  # noqa: E402 (the quickstart's own generator)

GADGETS = ["charger", "keyboard", "headset", "monitor", "router", "webcam", "speaker", "tablet", "cable", "adapter"]
DOZENS = {"a dozen": 12, "half a dozen": 6, "two dozen": 24, "a pair of": 2, "three dozen": 36, "a couple of": 2}
WHOLESALE = [
    "PO-{po}: {q} {c} {i}, deliver to our {city} warehouse",
    "Restock {city} - {q} {i} ({c})",
    "wholesale order: {q} {c} {i} -> {city} DC",
    "Need {q} {i} in {c} for the {city} depot, PO {po}",
    "{city} store asks for {q} {c} {i}, invoice {po}",
]
SHIFT_FROM_DAY = 3
"""Days 0-2 are quickstart-like; from day 3 (the 4th) on, this share of requests is wholesale:"""
SHIFTED_SHARE = {3: 0.4, 4: 0.6, 5: 0.6, 6: 0.6}


def familiar_request(rng: random.Random) -> tuple[list[dict], dict]:
    row = make_row(rng)
    return row["messages"][:2], json.loads(row["messages"][2]["content"])


def wholesale_request(rng: random.Random) -> tuple[list[dict], dict]:
    item, color, city = rng.choice(GADGETS), rng.choice(COLORS), rng.choice(CITIES)
    phrase = rng.choice(list(DOZENS))
    text = rng.choice(WHOLESALE).format(q=phrase, c=color, i=plural(item, DOZENS[phrase]), city=city,
                                        po=rng.randint(1000, 9999))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}], \
        {"item": item, "quantity": DOZENS[phrase], "color": color, "city": city}


def synthetic_answer(rng: random.Random, messages: list[dict], truth: dict, shifted: bool) -> str:
    """What a small model fine-tuned on the quickstart tends to answer: right on familiar text; on wholesale text a
    dozen read as its leading number word, the plural copied, the warehouse kept in the city."""
    answer = dict(truth)
    if shifted:
        phrase = next(p for p in DOZENS if p in messages[-1]["content"])
        first = phrase.split()[0]
        answer["quantity"] = next((n for n, word in NUMBER_WORDS.items() if word == first), 1)
        if rng.random() < 0.5:
            answer["item"] = plural(truth["item"], 2)
    elif rng.random() < 0.03:
        answer["color"] = rng.choice(COLORS)
    return json.dumps(answer)


def model_answers(served: str, conversations: list[list[dict]]) -> list[str]:
    """Greedy answers of the registered version `served` (as `tunesmith serve` would give them)."""
    from tunesmith.data.template import end_of_turn_token_ids
    from tunesmith.evaluate.generate import generate_batched
    from tunesmith.models import load_tokenizer, load_with_adapter
    from tunesmith.registry.run import Run
    from tunesmith.registry.store import Registry

    registry = Registry()
    run = Run.open(registry.local_copy(*registry.resolve(served)))
    tokenizer = load_tokenizer(run.weights_dir)
    model = load_with_adapter(run.base_source, run.weights_dir)
    print(f"answering {len(conversations)} requests with {served} ...", flush=True)
    answers = generate_batched(model, tokenizer, conversations, end_of_turn_token_ids(tokenizer), 64, 16)
    return [answer.text for answer in answers]


def register_tiny_production(served: str) -> None:
    """Train the quickstart on the tiny test model and make it `served` (e.g. orders@production), unless taken."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model  # the test suite's tiny chat model, built from scratch (no download)

    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.evaluate.run import evaluate_run
    from tunesmith.registry.register import register_run
    from tunesmith.registry.store import Registry, parse_reference
    from tunesmith.train.sft import train_sft

    if _registered(served) != (None, None):
        return
    name, alias = parse_reference(served)
    model_dir = Path("runs") / "tiny-model"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir)
    config = load_config(REPO / "examples" / "quickstart" / "config.yaml", [
        f"base_model={model_dir.resolve()}", "name=quickstart-tiny", "train.max_steps=40", "train.learning_rate=0.01",
        "train.precision=fp32", "evaluate.max_examples=30", "evaluate.max_new_tokens=16", "evaluate.general_check=false"])
    run_dir = prepare(config, overwrite=True)
    train_sft(run_dir, config)
    evaluate_run(run_dir, config)
    registry = Registry()
    info, _ = register_run(registry, run_dir, name)
    registry.move_alias(name, alias, info.version, "set", "the drift example's tiny stand-in for the quickstart", {})
    print(f"registered {run_dir} (tiny test model) as {name}@{info.version} and pointed {served} at it")


def verdict(rng: random.Random, wrong: bool, truth: dict) -> tuple[str, str | None] | None:
    """A caller's feedback on one answer: most wrong ones corrected, some right ones approved, most unrated."""
    if wrong:
        return ("negative", json.dumps(truth)) if rng.random() < 0.85 else None
    return ("positive", None) if rng.random() < 0.25 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, default=Path(__file__).with_name("requests"))
    parser.add_argument("--served", default="orders@production", help="The registered version that answers.")
    parser.add_argument("--answers", choices=("model", "synthetic", "auto"), default="auto",
                        help="auto: the served version when it is registered, else synthetic.")
    parser.add_argument("--per-day", type=int, default=40, help="Requests per day.")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--tiny", action="store_true", help="Serve the quickstart trained on the tiny test model "
                                                            "(set up when --served is not registered yet).")
    args = parser.parse_args()
    if args.tiny:
        register_tiny_production(args.served)
        args.answers = "synthetic" if args.answers == "auto" else args.answers

    from tunesmith.records import FeedbackRecord, RequestLogRecord
    from tunesmith.request_log import RequestLogWriter, append_feedback, utc_timestamp

    rng = random.Random(args.seed)
    start = datetime.now(timezone.utc) - timedelta(days=7)
    requests = []
    for day in range(7):
        for _ in range(args.per_day):
            shifted = rng.random() < SHIFTED_SHARE.get(day, 0.0)
            messages, truth = wholesale_request(rng) if shifted else familiar_request(rng)
            moment = start + timedelta(days=day, seconds=rng.uniform(0, 86_400))
            requests.append((moment, messages, truth, shifted))
    requests.sort(key=lambda request: request[0])
    name, version = _registered(args.served)
    if args.answers == "model" and version is None:
        raise SystemExit(f"{args.served} is not registered; register the quickstart run first (see README.md) "
                         "or pass --answers synthetic")
    if version is not None and args.answers != "synthetic":
        answers = model_answers(args.served, [messages for _, messages, _, _ in requests])
    else:
        answers = [synthetic_answer(rng, messages, truth, shifted) for _, messages, truth, shifted in requests]

    args.log_dir.mkdir(parents=True, exist_ok=True)
    counts = {"requests": 0, "shifted": 0, "wrong_familiar": 0, "wrong_shifted": 0, "corrections": 0, "approvals": 0}
    with RequestLogWriter(args.log_dir, content="redacted") as writer:
        for (moment, messages, truth, shifted), answer in zip(requests, answers):
            record_id = f"chatcmpl-{uuid.UUID(int=rng.getrandbits(128)).hex[:24]}"
            writer.append(RequestLogRecord(
                id=record_id, time=utc_timestamp(moment), endpoint="chat", model=name or "orders",
                served=args.served, registry_model=name or "orders", registry_version=version or "1",
                messages=messages, answers=[answer], prompt_tokens=60, completion_tokens=25,
                latency_s=round(rng.uniform(0.3, 1.5), 3), finish_reason="stop", status=200))
            wrong = _wrong(answer, truth)
            feedback = verdict(rng, wrong, truth)
            counts["requests"] += 1
            counts["shifted"] += shifted
            counts["wrong_shifted" if shifted else "wrong_familiar"] += wrong
            if feedback:
                rating, corrected = feedback
                counts["corrections" if corrected else "approvals"] += 1
                append_feedback(args.log_dir, FeedbackRecord(
                    id=f"fb-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}",
                    time=utc_timestamp(moment + timedelta(minutes=rng.uniform(1, 120))),
                    completion_id=record_id, rating=rating, corrected=corrected))
    source = f"{args.served} (version {version})" if args.answers != "synthetic" and version else "synthesized answers"
    print(f"wrote {counts['requests']} requests ({counts['shifted']} wholesale, from day {SHIFT_FROM_DAY + 1}) "
          f"answered by {source} to {args.log_dir}")
    print(f"  wrong answers: {counts['wrong_familiar']} of {counts['requests'] - counts['shifted']} familiar, "
          f"{counts['wrong_shifted']} of {counts['shifted']} wholesale; feedback: {counts['corrections']} "
          f"corrections, {counts['approvals']} approvals")


def _registered(reference: str) -> tuple[str | None, str | None]:
    """(model, version) behind `reference` when it is registered, else (None, None)."""
    from tunesmith.errors import TunesmithError
    from tunesmith.registry.store import Registry

    try:
        return Registry().resolve(reference)
    except TunesmithError:
        return None, None


def _wrong(answer: str, truth: dict) -> bool:
    try:
        return json.loads(answer) != truth
    except ValueError:
        return True


if __name__ == "__main__":
    main()
