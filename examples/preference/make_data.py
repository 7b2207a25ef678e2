"""Generate the preference example: order messages, a chosen reply (the exact JSON) and a rejected one.

Run: python examples/preference/make_data.py  (writes orders_preference.jsonl beside this script; seeded).
The rejected replies are the mistakes small models make on this task: chatty wrappers and code fences,
renamed keys, numbers as words, plural items, a missing key. Rows are in TRL's conversational preference
format: `prompt` turns, then `chosen` and `rejected` assistant turns.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "quickstart"))
from make_data import NUMBER_WORDS, make_row, plural  # noqa: E402  (the quickstart's order generator)


def rejected_reply(order: dict, rng: random.Random) -> str:
    """One plausible wrong answer for this order."""
    mistake = rng.randrange(5)
    if mistake == 0:
        return f"Sure! Here is the order you asked for:\n```json\n{json.dumps(order, indent=2)}\n```"
    if mistake == 1:
        return json.dumps({"product": order["item"], "qty": order["quantity"], "colour": order["color"],
                           "destination": order["city"]})
    if mistake == 2:
        words = dict(order, quantity=NUMBER_WORDS[order["quantity"]], item=plural(order["item"], 2))
        return json.dumps(words)
    if mistake == 3:
        return json.dumps({k: v for k, v in order.items() if k != "city"})
    return f"The customer wants {order['quantity']} {order['color']} {plural(order['item'], order['quantity'])} in {order['city']}."


def main(rows: int = 400, seed: int = 11) -> None:
    rng = random.Random(seed)
    seen, lines = set(), []
    while len(lines) < rows:
        system, user, answer = make_row(rng)["messages"]
        if user["content"] in seen:
            continue
        seen.add(user["content"])
        order = json.loads(answer["content"])
        lines.append(json.dumps({
            "prompt": [system, user],
            "chosen": [{"role": "assistant", "content": answer["content"]}],
            "rejected": [{"role": "assistant", "content": rejected_reply(order, rng)}],
        }))
    out = Path(__file__).with_name("orders_preference.jsonl")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} rows to {out}")


if __name__ == "__main__":
    main()
