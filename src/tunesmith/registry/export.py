"""Exports of a registered version: a merged Hugging Face folder, GGUF for llama.cpp, an Ollama Modelfile.

Files are written into a staging folder; the caller checks them (answers equal to what they were made from)
before the folder is renamed into place and recorded, so an interrupted or failed export leaves nothing that
looks finished.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.registry.run import Run

FORMATS = ("merged", "gguf", "ollama")
MERGED_DTYPES = {"fp32": "float32", "f32": "float32", "float32": "float32", "bf16": "bfloat16",
                 "bfloat16": "bfloat16", "fp16": "float16", "f16": "float16", "float16": "float16"}
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
LOSSLESS = {("merged", "float32"), ("gguf", "f32"), ("gguf", "f16"), ("ollama", "f32"), ("ollama", "f16")}
"""Exports whose greedy answers must agree with their source (>= MIN_AGREEMENT); others report agreement."""
MIN_AGREEMENT = 0.99


def check_request(fmt: str, dtype: str | None) -> str:
    """The export's dtype (defaults: fp32 merged, f16 GGUF); an unknown format or dtype is one clear error."""
    if fmt not in FORMATS:
        raise TunesmithError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "merged":
        if dtype is not None and dtype not in MERGED_DTYPES:
            raise TunesmithError(f"--dtype {dtype} for a merged export: choose fp32, bf16 or fp16")
        return MERGED_DTYPES[dtype or "fp32"]
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise TunesmithError(f"--dtype {dtype} for GGUF: choose one of {', '.join(GGUF_DTYPES)}")
    return dtype or "f16"


def merged_model(run: Run):
    """The run's weights as one plain fp32 model: the adapter merged into the base, or the full fine-tune."""
    from tunesmith.models import load_model, load_with_adapter

    if run.is_full_fine_tune:
        return load_model(run.weights_dir)
    model = load_with_adapter(run.base_source, run.weights_dir)
    return model.merge_and_unload()


def answering_model(run: Run):
    """What the version answers with when served: base + adapter unmerged (or the full fine-tune)."""
    from tunesmith.models import load_model, load_with_adapter

    return load_model(run.weights_dir) if run.is_full_fine_tune else load_with_adapter(run.base_source, run.weights_dir)


def save_merged(model, tokenizer, target: Path, torch_dtype: str, stop_ids: list[int]) -> None:
    """A folder bare `transformers` loads: safetensors weights, tokenizer with the chat template, and a generation
    config whose EOS ids are the end-of-turn tokens, so generation stops where the model was trained to stop."""
    import torch
    from transformers import GenerationConfig

    model = model.to(getattr(torch, torch_dtype))
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def gguf_file_name(model: str, version: str, dtype: str) -> str:
    return f"{model}-v{version}-{dtype}.gguf"


def write_modelfile(tokenizer, folder: Path, gguf_name: str, stop_ids: list[int], system: str | None) -> Path:
    from tunesmith.registry.ollama import ollama_modelfile

    path = folder / "Modelfile"
    path.write_text(ollama_modelfile(tokenizer, gguf_name, stop_ids, system), encoding="utf-8")
    return path


def data_system_prompt(run: Run) -> str | None:
    """The system prompt the training data had: the config's, or the one every held-out example shares."""
    configured = (run.config_dict().get("data") or {}).get("system_prompt")
    if configured:
        return configured
    path = run.directory / run.manifest.data.validation_file
    systems = set()
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                messages = json.loads(line).get("messages") or []
                systems.add(messages[0]["content"] if messages and messages[0].get("role") == "system" else None)
    return systems.pop() if len(systems) == 1 else None


def check_passed(fmt: str, dtype: str, checks: dict) -> bool:
    return (fmt, dtype) not in LOSSLESS or checks["agreement"] >= MIN_AGREEMENT
