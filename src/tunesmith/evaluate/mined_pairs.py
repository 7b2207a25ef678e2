"""Preference pairs from a trained run's own mistakes: sample its answers to its training prompts, score each against
the reference, and pair the reference (chosen) with the wrong answer the model gave most often (rejected).

DPO then pushes probability away from mistakes this model really makes, instead of from made-up ones it never
would. Reads the run directory; writes one preference JSONL file (prompt/chosen/rejected, conversational), atomically.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import load_run_config
from tunesmith.data.prepare import read_split
from tunesmith.data.template import end_of_turn_token_ids
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.contenders import load_contenders, switched_to
from tunesmith.data.answers import is_exact_match
from tunesmith.generation.batch_generate import sample_batched
from tunesmith.models import load_tokenizer
from tunesmith.registry.run import Run
from tunesmith.registry.run_dir import write_text_atomic


@dataclass
class MinedPairs:
    prompts: int
    samples: int
    wrong_answers: int
    pairs: int
    skipped_with_tools: int
    examples: list[dict] = field(default_factory=list)
    """A few pairs to show: prompt text, reference and the mistake."""

    @property
    def error_rate(self) -> float:
        return self.wrong_answers / max(self.prompts * self.samples, 1)


def mine_pairs(run_dir: Path, out: Path, samples: int = 4, temperature: float = 1.0, max_prompts: int | None = None,
               seed: int = 0, batch_size: int = 16, max_new_tokens: int | None = None,
               on_progress=None, cut: bool = True, on_start=None) -> MinedPairs:
    """Write `out` with one pair per training prompt the run answered wrongly at least once in `samples` tries.
    `on_start(prompts)` says how many prompts will be asked; `on_progress(1)` follows each.

    `cut`: the rejected answer ends just after its first wrong word. DPO lowers every token of the rejected answer,
    and after a wrong city the rest (`"}`) is the same as in the right answers: measured on the quickstart, whole
    wrong answers taught the model to close its JSON with `")` (valid JSON 100% -> 89% sampled)."""
    if samples < 1 or temperature <= 0:
        raise TunesmithError(f"mining needs sampled answers: samples must be >= 1 (got {samples}) and temperature "
                             f"> 0 (got {temperature}); 1.0 samples as a client with default settings would")
    run = Run.open(run_dir)
    if not run.is_trained:
        raise TunesmithError(f"{run_dir} is not trained yet; mine pairs from a trained run (tunesmith train first)")
    if run.data_kind != "sft":
        raise TunesmithError(f"{run_dir} was trained on preference data; mine pairs from an SFT run, whose training "
                             "split has reference answers")
    settings = load_run_config(run_dir).evaluate
    examples = read_split(run.directory, "train")
    with_tools = [e for e in examples if e.tools]
    examples = [e for e in examples if not e.tools][:max_prompts]
    if not examples:
        raise TunesmithError(f"{run_dir}: no training examples without tools to mine pairs from")
    run.verify_weights()
    tokenizer = load_tokenizer(run.weights_dir)
    model, contenders = load_contenders(run, tokenizer, [], compare_base=False)
    prompts = [e.prompt_messages() for e in examples]
    if on_start:
        on_start(len(prompts))
    with switched_to(model, contenders[0]) as active:
        answers = sample_batched(active, tokenizer, prompts, end_of_turn_token_ids(tokenizer),
                                 max_new_tokens or settings.max_new_tokens, batch_size, on_batch=on_progress,
                                 temperature=temperature, samples=samples, seed=seed)
    rows, wrong_total, shown = [], 0, []
    for example, prompt, choices in zip(examples, prompts, answers):
        reference = example.reference()
        wrong = [c.text for c in choices if not is_exact_match(c.text, reference, settings.json_output)]
        wrong_total += len(wrong)
        if not wrong:
            continue
        mistake = Counter(wrong).most_common(1)[0][0]
        rejected = cut_after_first_mistake(mistake, reference) if cut else mistake
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": reference}],
               "rejected": [{"role": "assistant", "content": rejected}]}
        if len(rejected) < len(mistake):  # training must not end the turn after the cut (it did not end there)
            row["rejected_cut"] = True
        rows.append(row)
        if len(shown) < 3:
            shown.append({"prompt": prompt[-1]["content"], "reference": reference, "mistake": rejected})
    if not rows:
        raise TunesmithError(f"{run_dir} answered all {len(examples)} training prompts right in {samples} samples "
                             f"each at temperature {temperature}: there are no mistakes to learn from (raise "
                             "--temperature or --samples, or preference tuning has nothing to add here)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return MinedPairs(len(examples), samples, wrong_total, len(rows), len(with_tools), shown)



def cut_after_first_mistake(mistake: str, reference: str) -> str:
    """`mistake` up to the end of the first word where it leaves `reference` (all of it when it never does)."""
    start = next((i for i, (a, b) in enumerate(zip(mistake, reference)) if a != b), min(len(mistake), len(reference)))
    if start >= len(mistake):
        return mistake  # a prefix of the reference: it stopped (or was cut) too early, the whole of it is the mistake
    end = start + 1
    while end < len(mistake) and (mistake[end].isalnum() or mistake[end] in "_-'"):
        end += 1
    return mistake[:end]
