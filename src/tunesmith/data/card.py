"""Token statistics through the target tokenizer and chat template, and the data card (markdown + HTML)."""

from __future__ import annotations

import html
import json
import math

import numpy as np

from tunesmith.data.template import IGNORE_INDEX, tokenize_example

HISTOGRAM_BINS = 20


def conversations(kind: str, record: dict) -> list[tuple[list[dict], bool]]:
    """The rendered conversations of a run-directory record, each with whether it counts toward training length."""
    prompt = record["messages"]
    if kind == "preference":
        return [(prompt + [{"role": "assistant", "content": record["chosen"]}], True),
                (prompt + [{"role": "assistant", "content": record["rejected"]}], True)]
    if kind == "unpaired_preference":
        return [(prompt + [{"role": "assistant", "content": record["completion"]}], True)]
    return [(prompt, True)]


class TokenStats:
    """Token counts per split; exact up to `sample_rows` rows per split, else from a content-hash sample."""

    def __init__(self, tokenizer, kind: str, max_length: int, rows_per_split: dict[str, int], sample_rows: int):
        self.tokenizer, self.kind, self.max_length = tokenizer, kind, max_length
        self.rows = rows_per_split
        self.every = {split: max(1, math.ceil(rows / max(sample_rows, 1))) for split, rows in rows_per_split.items()}
        self.lengths = {split: [] for split in rows_per_split}
        self.trained = {split: [] for split in rows_per_split}
        self.weights = {split: [] for split in rows_per_split}

    def wants(self, split: str, content: str) -> bool:
        return int(content[:12], 16) % self.every[split] == 0

    def add(self, split: str, record: dict, copies: int = 1) -> None:
        length = trained = 0
        for messages, _ in conversations(self.kind, record):
            example = tokenize_example(self.tokenizer, messages, max_length=10**9, tools=record.get("tools"))
            length = max(length, len(example.input_ids))
            trained += sum(1 for label in example.labels[: self.max_length] if label != IGNORE_INDEX)
        self.lengths[split].append(length)
        self.trained[split].append(trained)
        self.weights[split].append(copies)

    def summary(self) -> dict:
        return {split: self._split_summary(split) for split in self.rows}

    def _split_summary(self, split: str) -> dict:
        lengths = np.array(self.lengths[split], dtype=np.int64)
        weights = np.array(self.weights[split], dtype=np.float64)
        if not len(lengths):
            return {"rows": self.rows[split], "sampled_rows": 0, "total": 0, "trained": 0, "trained_share": 0.0,
                    "longest": 0, "truncated_examples": 0, "estimated": False, "histogram": {"edges": [], "counts": []}}
        scale = self.rows[split] / weights.sum()  # sample -> whole split (rows already counted with their copies)
        total = float((lengths * weights).sum() * scale)
        kept = np.minimum(lengths, self.max_length)
        trained = float((np.array(self.trained[split]) * weights).sum() * scale)
        counts, edges = np.histogram(lengths, bins=min(HISTOGRAM_BINS, max(1, len(np.unique(lengths)))), weights=weights)
        return {
            "rows": self.rows[split], "sampled_rows": len(lengths), "estimated": bool(scale > 1.0001),
            "total": round(total), "trained": round(trained), "trained_share": round(trained / max(total, 1), 4),
            "tokens_per_epoch": round(float((kept * weights).sum() * scale)),
            "mean": round(float(np.average(lengths, weights=weights)), 1),
            "p50": int(np.percentile(lengths, 50)), "p95": int(np.percentile(lengths, 95)), "longest": int(lengths.max()),
            "truncated_examples": round(float(((lengths > self.max_length) * weights).sum() * scale)),
            "histogram": {"edges": [round(float(e), 1) for e in edges], "counts": [round(float(c * scale)) for c in counts]},
        }


def card_markdown(data: dict, name: str) -> str:
    """The data card: sources, accounting, cleaning, duplicates, leakage, PII, token statistics, version."""
    acc = data["accounting"]
    lines = [f"# Data card: {name}", "", f"- **version (content hash)**: `{data['dataset_hash']}`",
             f"- **kind**: {data['kind']}", f"- **chat template sha**: `{data['chat_template_sha']}`", "",
             "## Sources", "", "| file | format | weight |", "|---|---|---|"]
    lines += [f"| `{s['path']}` | {s['format']} | {s['weight']} |" for s in data["sources"]]
    lines += ["", "## Accounting", "", f"Rows read **{acc['read']}** = kept **{acc['kept']}** + dropped "
              f"**{sum(acc['dropped'].values())}** (listed in `{data['dropped_file']}`).", "",
              "| dropped because | rows |", "|---|---|"]
    lines += [f"| {reason} | {count} |" for reason, count in sorted(acc["dropped"].items())] or ["| (none) | 0 |"]
    if acc["flagged"]:
        lines += ["", "Flagged but kept: " + ", ".join(f"{n} {k}" for k, n in acc["flagged"].items())]
    lines += ["", "## Duplicates", "", f"Dedup: {data['dedup']['mode']} (near-duplicate threshold "
              f"{data['dedup']['threshold']}); largest clusters (one row kept each):", ""]
    lines += [f"- {c['size']} rows, kept {c['kept']}, dropped {', '.join(c['dropped'])}" for c in data["dedup"]["clusters"]]
    lines += ["", "## PII", "", "Redaction " + ("on: " + (", ".join(f"{n} {k}" for k, n in data["pii"]["redacted"].items())
                                                          or "nothing found") if data["pii"]["enabled"] else "off.")]
    lines += ["", "## Tokens", "", "| split | rows | tokens | trained share | tokens/epoch | mean | p95 | longest | truncated |",
              "|---|---|---|---|---|---|---|---|---|"]
    for split, t in data["tokens"].items():
        lines.append(f"| {split} | {t['rows']} | {t['total']:,} | {t['trained_share']:.1%} | {t.get('tokens_per_epoch', 0):,} | "
                     f"{t.get('mean', 0)} | {t.get('p95', 0)} | {t['longest']} | {t['truncated_examples']} |")
    if any(t.get("estimated") for t in data["tokens"].values()):
        lines += ["", "Token figures are estimated from a content-hash sample (`data.token_stats_rows`)."]
    return "\n".join(lines) + "\n"


def card_html(markdown_text: str, data: dict) -> str:
    """A self-contained HTML page: the card text plus an SVG length histogram per split."""
    charts = "".join(_histogram_svg(split, t["histogram"]) for split, t in data["tokens"].items())
    body = html.escape(markdown_text)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Data card</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto}pre{white-space:pre-wrap}"
            "svg{margin:1rem 0;border:1px solid #ddd}</style></head><body>"
            f"<h2>Token length histograms</h2>{charts}<pre>{body}</pre>"
            f"<script type='application/json' id='data'>{html.escape(json.dumps(data, default=str))}</script></body></html>\n")


def _histogram_svg(split: str, histogram: dict, width: int = 600, height: int = 200) -> str:
    counts, edges = histogram["counts"], histogram["edges"]
    if not counts:
        return f"<p>{html.escape(split)}: no rows</p>"
    peak, bar = max(max(counts), 1), width / len(counts)
    bars = "".join(
        f"<rect x='{i * bar:.1f}' y='{height - 20 - c / peak * (height - 40):.1f}' width='{bar - 1:.1f}' "
        f"height='{c / peak * (height - 40):.1f}' fill='#4a7'><title>{edges[i]:g}-{edges[i + 1]:g} tokens: {c}</title></rect>"
        for i, c in enumerate(counts))
    return (f"<h3>{html.escape(split)}</h3><svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>"
            f"{bars}<text x='0' y='{height - 4}' font-size='11'>{edges[0]:g}</text>"
            f"<text x='{width - 40}' y='{height - 4}' font-size='11'>{edges[-1]:g} tokens</text></svg>")
