"""Generate the prompting example's dataset: clear one-line product reviews -> `positive` or `negative`.

Run: python examples/prompting/make_data.py  (writes reviews.jsonl beside this script; seeded, so the same file comes
out every time). Zero-shot, SmolLM2-135M-Instruct answers in sentences instead of the one word; shown four labelled
reviews it answers with the label, and right, so `tunesmith advise` says fine-tuning is not worth it here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Classify the sentiment of the review. Answer with one word: positive or negative."
THINGS = ["phone", "movie", "hotel", "pizza", "book", "laptop", "chair", "restaurant", "game", "jacket", "blender",
          "headset", "camera", "sofa", "backpack", "coffee", "concert", "bike", "watch", "tent", "printer", "lamp",
          "keyboard", "mattress", "kettle", "umbrella", "museum", "album", "cafe", "vacuum"]
POSITIVE = ["I loved this {x}, it is wonderful.", "What a fantastic {x}!", "This {x} is great and I am very happy with it.",
            "Absolutely excellent {x}, highly recommended.", "The {x} works perfectly. Superb!",
            "Best {x} I have ever had, amazing.", "Such a delightful {x}, I would buy it again.",
            "The {x} exceeded my expectations, brilliant.", "I am thrilled with the {x}, it is perfect.",
            "Lovely {x}, everyone should get one."]
NEGATIVE = ["I hated this {x}, it is awful.", "What a terrible {x}!", "This {x} is broken and I am very angry.",
            "Absolutely horrible {x}, do not buy it.", "The {x} stopped working. Useless!",
            "Worst {x} I have ever had, disgusting.", "Such a disappointing {x}, I want my money back.",
            "The {x} was a complete waste of money.", "I regret buying the {x}, it is dreadful.",
            "Awful {x}, avoid it at all costs."]


def make_row(rng: random.Random) -> dict:
    label = rng.choice(["positive", "negative"])
    review = rng.choice(POSITIVE if label == "positive" else NEGATIVE).format(x=rng.choice(THINGS))
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": review},
                         {"role": "assistant", "content": label}]}


def main(rows: int = 400, seed: int = 11) -> None:
    rng = random.Random(seed)
    by_review: dict[str, dict] = {}  # one row per distinct review, in the order first drawn
    while len(by_review) < rows:
        row = make_row(rng)
        by_review.setdefault(row["messages"][1]["content"], row)
    out = Path(__file__).with_name("reviews.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in by_review.values()), encoding="utf-8")
    print(f"wrote {len(by_review)} rows to {out}")


if __name__ == "__main__":
    main()
