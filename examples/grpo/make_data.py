"""Generate the GRPO example's prompts: the quickstart orders, with one sample answer shown in the system prompt.

Run: python examples/grpo/make_data.py  (reads examples/quickstart/orders.jsonl, writes orders_grpo.jsonl beside
this script). GRPO learns only from groups whose sampled answers differ in reward: zero-shot, the base model almost
never writes this JSON (every answer scores 0); shown one sample answer it sometimes does, which is the signal GRPO
amplifies. The dataset's answers stay as the references the rewards compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

SYSTEM = ('Extract the order from the customer\'s message. Reply with JSON only, like '
          '{"item": "mug", "quantity": 2, "color": "red", "city": "Paris"}')
ROWS = 200


def main() -> None:
    here = Path(__file__).parent
    source = here.parent / "quickstart" / "orders.jsonl"
    lines = []
    for line in source.read_text(encoding="utf-8").splitlines()[:ROWS]:
        row = json.loads(line)
        row["messages"][0] = {"role": "system", "content": SYSTEM}
        lines.append(json.dumps(row))
    out = here / "orders_grpo.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} rows to {out}")


if __name__ == "__main__":
    main()
