"""A Hugging Face model card (YAML metadata + sections) for a registered version, built from its lineage."""

from __future__ import annotations

from tunesmith.models import DEFAULT_MODEL_NAME
from tunesmith.records import Lineage

DEFAULT_MODEL_HUB_ID = f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"
DEFAULT_MODEL_LICENSE = "apache-2.0"
REPORTED = ("exact_match", "exact_match_raw", "token_f1", "rouge_l", "accuracy", "macro_f1", "json_valid",
            "json_schema", "regex_match", "field_accuracy", "perplexity", "general_ppl", "general_qa", "stop_rate")


def model_card(lineage: Lineage, version: str, data_card: str | None = None) -> str:
    """The card's text: metadata that `huggingface_hub.ModelCard` parses, then the sections a reader needs."""
    from huggingface_hub import ModelCardData

    name = f"{lineage.model}-v{version}"
    metadata = ModelCardData(
        model_name=name, base_model=hub_name(lineage.base_model["name"]),
        library_name="transformers" if _full(lineage) else "peft", license=_license(lineage),
        tags=["tunesmith", lineage.train.get("adapter", ""), lineage.train.get("method", "").split("-")[-1],
              "text-generation"],
        datasets=[source["path"].rsplit("/", 1)[-1] for source in lineage.data.get("sources") or []] or None,
        pipeline_tag="text-generation", eval_results=_eval_results(lineage, name) or None,
    )
    body = "\n\n".join(section for section in (
        f"# {name}",
        f"A fine-tune of `{lineage.base_model['name']}` made with tunesmith from run `{lineage.run_name}` "
        f"(content id `{lineage.content_id[:16]}`).",
        _intended_use(lineage), _training_data(lineage, data_card), _procedure(lineage), _evaluation(lineage),
        _forgetting(lineage), _limitations(lineage), _hardware(lineage), _lineage_section(lineage), _usage(lineage),
    ) if section)
    return f"---\n{metadata.to_yaml()}\n---\n\n{body}\n"


def hub_name(base_model: str) -> str:
    return DEFAULT_MODEL_HUB_ID if base_model == "default" else base_model.rstrip("/").rsplit("/", 2)[-1] \
        if base_model.startswith(("/", ".", "~")) else base_model


def _full(lineage: Lineage) -> bool:
    return lineage.train.get("adapter") == "full"


def _license(lineage: Lineage) -> str:
    return DEFAULT_MODEL_LICENSE if lineage.base_model["name"] == "default" else "other"


def _eval_results(lineage: Lineage, name: str) -> list:
    from huggingface_hub import EvalResult

    evaluation = lineage.evaluation or {}
    scores = evaluation.get("results", {}).get("fine-tuned", {})
    return [EvalResult(task_type="text-generation", task_name=f"{lineage.model} task", dataset_type="json",
                       dataset_name=f"{lineage.run_name} held-out split", dataset_split="validation",
                       metric_type=metric, metric_value=float(scores[metric]), metric_name=metric)
            for metric in REPORTED if metric in scores]


def _intended_use(lineage: Lineage) -> str:
    system = (lineage.config.get("data") or {}).get("system_prompt")
    return ("## Intended use\n\nThe task of its training data (below): answer prompts like the ones in the held-out "
            "split, with the same chat template it was trained with" + (f" and the system prompt `{system}`" if system
                                                                          else "") +
            ". It is not meant for other tasks without evaluating it on them first.")


def _training_data(lineage: Lineage, data_card: str | None) -> str:
    data = lineage.data
    rows = data.get("rows", {})
    accounting = data.get("accounting", {})
    lines = ["## Training data", "",
             f"- {rows.get('train', '?')} training / {rows.get('validation', '?')} held-out rows ({data.get('kind')})",
             f"- dataset hash `{data['dataset_hash']}`",
             f"- rows read {accounting.get('read', '?')}, kept {accounting.get('kept', '?')}, dropped "
             f"{sum((accounting.get('dropped') or {}).values())}"]
    lines += [f"- source `{s['path']}` ({s['format']}, weight {s['weight']}{', held out' if s.get('held_out') else ''})"
              for s in data.get("sources") or []]
    if data_card:
        lines += ["", "<details><summary>Data card</summary>", "", data_card.strip(), "", "</details>"]
    return "\n".join(lines)


def _procedure(lineage: Lineage) -> str:
    config = lineage.train.get("config", {})
    metrics = lineage.train.get("metrics", {})
    lora = config.get("lora") or {}
    rows = [("method", lineage.train.get("method")), ("adapter", config.get("adapter")),
            ("LoRA rank / alpha", f"{lora.get('r')} / {lora.get('alpha')}" if config.get("adapter") != "full" else None),
            ("learning rate", config.get("learning_rate")), ("epochs", config.get("epochs")),
            ("max steps", config.get("max_steps")), ("batch size x grad accum",
                                                     f"{config.get('batch_size')} x {config.get('grad_accum')}"),
            ("precision", lineage.train.get("precision")), ("max length", lineage.train.get("max_length")),
            ("steps run", metrics.get("steps")), ("final train loss", metrics.get("train_loss")),
            ("validation loss", metrics.get("validation_loss"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    return f"## Training procedure and hyperparameters\n\n| setting | value |\n|---|---|\n{table}"


def _evaluation(lineage: Lineage) -> str:
    evaluation = lineage.evaluation
    if not evaluation:
        return "## Evaluation\n\nNot evaluated before registration (`tunesmith evaluate` adds it to new versions)."
    base, tuned = evaluation["results"].get("base", {}), evaluation["results"].get("fine-tuned", {})
    deltas = evaluation.get("comparisons", {}).get("fine-tuned", {})
    confidence = int(round(evaluation.get("confidence", 0.95) * 100))
    lines = ["## Evaluation against the base model", "",
             f"{evaluation['examples']} held-out examples, greedy decoding; differences with a {confidence}% paired "
             "bootstrap interval.", "", "| metric | base | fine-tuned | difference [interval] |", "|---|---|---|---|"]
    for metric in REPORTED:
        if metric in tuned and metric not in ("general_ppl", "general_qa"):
            delta = deltas.get(metric, {})
            interval = (f"{delta['delta']:+.3f} [{delta['delta_low']:+.3f}, {delta['delta_high']:+.3f}]"
                        if "delta" in delta else "")
            lines.append(f"| {metric} | {_number(base.get(metric))} | {_number(tuned[metric])} | {interval} |")
    gates = evaluation.get("gates") or []
    if gates:
        lines += ["", "Gates: " + "; ".join(f"`{g['gate']}` {'passed' if g['passed'] else 'FAILED'}" for g in gates)]
    return "\n".join(lines)


def _forgetting(lineage: Lineage) -> str:
    results = (lineage.evaluation or {}).get("results", {})
    base, tuned = results.get("base", {}), results.get("fine-tuned", {})
    if "general_ppl" not in tuned:
        return "## Forgetting check\n\nNot run (`evaluate.general_check` was off)."
    return ("## Forgetting check\n\nGeneral ability on tunesmith's shipped CC0 sets, base vs fine-tuned:\n\n"
            f"- general text perplexity: {_number(base.get('general_ppl'))} -> {_number(tuned['general_ppl'])}\n"
            f"- general questions answered: {_number(base.get('general_qa'))} -> {_number(tuned.get('general_qa'))}")


def _limitations(lineage: Lineage) -> str:
    notes = ["Measured only on the held-out split of its own data; behaviour on other inputs is not measured.",
             f"Inherits the limitations and license terms of its base model `{lineage.base_model['name']}`."]
    overfitting = (lineage.evaluation or {}).get("overfitting") or {}
    if overfitting.get("overfitting"):
        notes.append("The validation loss rose while the training loss fell (overfitting warning).")
    notes += lineage.train.get("warnings") or []
    return "## Limitations\n\n" + "\n".join(f"- {note}" for note in notes)


def _hardware(lineage: Lineage) -> str:
    environment, train = lineage.environment, lineage.train
    metrics = train.get("metrics", {})
    return ("## Hardware and time\n\n"
            f"- platform: {environment.get('platform', '?')}, Python {environment.get('python', '?')}\n"
            f"- {train.get('processes', 1)} process(es), {train.get('threads', '?')} CPU threads, "
            f"precision {train.get('precision')}\n"
            f"- training wall time {train.get('wall_time_s')} s, {metrics.get('tokens_per_second')} tokens/s")


def _lineage_section(lineage: Lineage) -> str:
    code = lineage.code
    libraries = ", ".join(f"{k} {v}" for k, v in (lineage.environment.get("libraries") or {}).items() if v)
    parent = lineage.parent
    return ("## Lineage\n\n"
            f"- base model: `{lineage.base_model['name']}` (weights sha256 `{lineage.base_model.get('weights_sha256')}`)\n"
            f"- trained weights sha256 `{lineage.weights_sha256}`\n"
            f"- code: tunesmith {code.tunesmith}" + (f", commit `{code.git_commit}`" if code.git_commit else "") + "\n"
            f"- libraries: {libraries}\n"
            + (f"- continued from run `{parent.get('name')}`" + (f" (version {parent['version']})"
                                                                  if parent.get("version") else "") + "\n" if parent else ""))


def _usage(lineage: Lineage) -> str:
    reference = f"{lineage.model}@VERSION"
    return ("## How to use\n\n```bash\n"
            f"tunesmith serve {reference}            # OpenAI-compatible API\n"
            f"tunesmith export {reference} --format merged   # plain transformers folder\n"
            f"tunesmith export {reference} --format gguf --dtype q8_0   # llama.cpp / Ollama\n```")


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"
