"""Generate the quickstart dataset: short customer messages -> an order as JSON with fixed keys.

Run: python examples/quickstart/make_data.py  (writes orders.jsonl beside this script; seeded, so the
same file comes out every time). A small model asked for this JSON zero-shot gets keys, types or
values wrong; a few minutes of LoRA on these rows teaches it the exact format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = ("Extract the order from the customer's message. Reply with JSON only, with exactly the keys "
          "item (singular noun), quantity (integer), color, city.")
ITEMS = ["mug", "lamp", "chair", "notebook", "backpack", "umbrella", "scarf", "teapot", "candle", "pillow",
         "blanket", "jacket", "helmet", "bottle", "basket", "kettle", "towel", "sweater", "wallet", "clock",
         "vase", "bucket", "hat", "glove", "rug", "mirror", "bowl", "plate", "stool", "tent"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "orange", "purple", "gray", "pink", "brown", "teal"]
CITIES = ["Denver", "Lisbon", "Osaka", "Nairobi", "Toronto", "Madrid", "Chicago", "Berlin", "Lima", "Dublin",
          "Austin", "Seoul", "Oslo", "Cairo", "Boston", "Prague", "Sydney", "Quito", "Vienna", "Seattle",
          "Porto", "Dallas", "Hanoi", "Zurich", "Atlanta", "Warsaw", "Manila", "Phoenix", "Helsinki", "Accra"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}
TEMPLATES = [
    "Hi, I'd like {q} {c} {i} delivered to {city}, please.",
    "Please send {q} {c} {i} to our office in {city}.",
    "Can I order {q} {c} {i}? Ship to {city}.",
    "Order for {city}: {q} {i}, color {c}.",
    "We need {q} {i} in {c} for the {city} store.",
    "Ship {q} of the {c} {i} to {city} asap!",
    "hello! {q} {c} {i} to {city} thanks",
    "My address is in {city}. I want {q} {i}, the {c} ones.",
    "Could you deliver {q} {c} {i} to {city} by Friday?",
    "{city} branch requests {q} {i} ({c}).",
    "I'm ordering {q} {i}. Color: {c}. Destination: {city}.",
    "Please book {q} {c} {i} for delivery in {city}.",
    "Quick order - {q} x {c} {i}, deliver to {city}.",
    "Send {q} {i} to {city}. Make them {c}.",
    "For our team in {city} we'd like {q} {c} {i}.",
]


def plural(item: str, quantity: int) -> str:
    if quantity == 1:
        return item
    return item + ("es" if item.endswith(("sh", "ch", "s", "x")) else "s")


def make_row(rng: random.Random) -> dict:
    item, color, city = rng.choice(ITEMS), rng.choice(COLORS), rng.choice(CITIES)
    quantity = rng.randint(1, 12)
    spoken = NUMBER_WORDS[quantity] if rng.random() < 0.4 else str(quantity)
    text = rng.choice(TEMPLATES).format(q=spoken, c=color, i=plural(item, quantity), city=city)
    answer = json.dumps({"item": item, "quantity": quantity, "color": color, "city": city})
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": answer}]}


def main(rows: int = 600, seed: int = 7) -> None:
    rng = random.Random(seed)
    seen, lines = set(), []
    while len(lines) < rows:
        row = make_row(rng)
        key = row["messages"][1]["content"]
        if key not in seen:
            seen.add(key)
            lines.append(json.dumps(row))
    out = Path(__file__).with_name("orders.jsonl")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} rows to {out}")


if __name__ == "__main__":
    main()
