"""Write a peft LoRA adapter as a llama.cpp LoRA GGUF, laid out as llama.cpp's convert_lora_to_gguf.py lays it out,
so llama-server loads it beside the base model's GGUF (`--lora FILE`) and applies it per request.

What llama.cpp reads (src/llama-adapter.cpp): `general.type` = "adapter", `general.architecture` equal to the base
GGUF's, `adapter.type` = "lora", `adapter.lora.alpha` (f32); and for each adapted weight of the base, a tensor pair
`<base GGUF name>.lora_a` with numpy shape (rank, in) and `.lora_b` with (out, rank), in f32 or f16. llama.cpp
scales B·A by alpha / rank, the rank read off the tensors, as peft does; an rsLoRA adapter (alpha / sqrt(rank)) is
written with alpha·sqrt(rank) so the product is the same. The base GGUF regroups llama's q/k rows for its rope
(`gguf_export.permute_for_llama_rope`); B·A's rows are B's rows, so lora_b gets the same regrouping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.registry.gguf_export import (
    GGUF_ARCHITECTURES,
    PERMUTED_ARCHITECTURES,
    finish_gguf_file,
    permute_for_llama_rope,
    staged_gguf,
)

LORA_DTYPES = ("f32", "f16")
PEFT_PREFIX = "base_model.model."


def write_lora_gguf(adapter_dir: Path, base_dir: Path, out_path: Path, dtype: str = "f16") -> dict:
    """Convert the peft adapter in `adapter_dir`, trained on the Hugging Face model in `base_dir`, into the llama.cpp
    LoRA GGUF `out_path` (written atomically). Returns what was written."""
    import gguf

    adapter_dir, base_dir, out_path = Path(adapter_dir), Path(base_dir), Path(out_path)
    if dtype not in LORA_DTYPES:
        raise TunesmithError(f"LoRA GGUF dtype {dtype!r}: choose one of {', '.join(LORA_DTYPES)}")
    adapter = read_lora_config(adapter_dir)
    base = _base_config(base_dir)
    arch = GGUF_ARCHITECTURES[base["model_type"]]
    rank = int(adapter["r"])
    alpha = float(adapter["lora_alpha"]) * (math.sqrt(rank) if adapter.get("use_rslora") else 1.0)
    tensors = lora_tensors(adapter_dir, base, arch, dtype)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter_dir.parent.name or adapter_dir.name)
    for name, array in tensors:
        writer.add_tensor(name, array)
    digest = _write_atomic(writer, out_path)
    return {"path": str(out_path), "sha256": digest, "bytes": out_path.stat().st_size, "architecture": arch,
            "alpha": alpha, "rank": rank, "tensors": len(tensors), "dtype": dtype}


def read_lora_config(adapter_dir: Path) -> dict:
    """The adapter's `adapter_config.json`, refused (with what to do) when llama.cpp could not apply it as is."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file() or not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise TunesmithError(f"{adapter_dir}: not a peft adapter folder (adapter_config.json and "
                             "adapter_model.safetensors); re-run `tunesmith train`")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config["peft_type"]
        raise TunesmithError(f"{adapter_dir}: a {kind} adapter; llama.cpp applies plain LoRA only, so export a "
                             "merged GGUF (`tunesmith export --format gguf`) and serve that")
    if config.get("modules_to_save") or config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise TunesmithError(f"{adapter_dir}: the adapter also trains whole modules or biases, which a llama.cpp LoRA "
                             "cannot carry; export a merged GGUF (`tunesmith export --format gguf`) and serve that")
    if config.get("alpha_pattern") or (config.get("use_rslora") and config.get("rank_pattern")):
        raise TunesmithError(f"{adapter_dir}: per-layer alpha (alpha_pattern, or rsLoRA with rank_pattern) cannot be "
                             "written to one adapter.lora.alpha; export a merged GGUF instead")
    if config.get("fan_in_fan_out"):
        raise TunesmithError(f"{adapter_dir}: fan_in_fan_out adapters (GPT-2 style Conv1D) are not supported")
    return config


def lora_tensors(adapter_dir: Path, base: dict, arch: str, dtype: str) -> list[tuple[str, object]]:
    """(GGUF name, numpy array) for every lora_a / lora_b pair, in the base GGUF's block order."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    model_arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    names = gguf.get_tensor_name_map(model_arch, base["num_hidden_layers"])
    pairs: dict[str, dict[str, object]] = {}
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            module, part = _split_lora_key(key, adapter_dir)
            pairs.setdefault(module, {})[part] = handle.get_tensor(key).float().numpy()
    out_type = np.float16 if dtype == "f16" else np.float32
    tensors = []
    for module in sorted(pairs, key=_module_order):
        pair = pairs[module]
        if set(pair) != {"a", "b"}:
            raise TunesmithError(f"{adapter_dir}: {module} has only lora_{''.join(pair).upper()}; the adapter file "
                                 "is incomplete; re-run `tunesmith train`")
        gguf_name = _gguf_weight_name(module, names, base, adapter_dir)
        lora_b = _regrouped_for_rope(pair["b"], gguf_name, base, arch)
        tensors.append((f"{gguf_name}.lora_a", np.ascontiguousarray(pair["a"], dtype=out_type)))
        tensors.append((f"{gguf_name}.lora_b", np.ascontiguousarray(lora_b, dtype=out_type)))
    if not tensors:
        raise TunesmithError(f"{adapter_dir}: the adapter holds no LoRA weights; re-run `tunesmith train`")
    return tensors


def _split_lora_key(key: str, adapter_dir: Path) -> tuple[str, str]:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0.self_attn.q_proj`, `a`)."""
    for marker, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
        if key.endswith(marker):
            return key.removeprefix(PEFT_PREFIX).removesuffix(marker), part
    if ".lora_embedding_" in key:
        raise TunesmithError(f"{adapter_dir}: LoRA on the token embeddings is not exported to llama.cpp here; "
                             "export a merged GGUF (`tunesmith export --format gguf`) instead")
    raise TunesmithError(f"{adapter_dir}: unexpected tensor {key!r} (not a lora_A/lora_B weight); "
                         "export a merged GGUF (`tunesmith export --format gguf`) instead")


def _gguf_weight_name(module: str, names, base: dict, adapter_dir: Path) -> str:
    if module == "lm_head" and base.get("tie_word_embeddings"):
        # The base GGUF has no output.weight then; llama.cpp would apply it to nothing (llama.cpp issue 9065).
        raise TunesmithError(f"{adapter_dir}: the adapter adapts lm_head, which this model ties to its embeddings; "
                             "export a merged GGUF instead, or retrain without lm_head in target_modules")
    name = names.get_name(module)
    if name is None:
        raise TunesmithError(f"{adapter_dir}: no GGUF tensor for the adapted layer {module!r}; is the adapter "
                             "for this base model?")
    return f"{name}.weight"


def _regrouped_for_rope(lora_b, gguf_name: str, base: dict, arch: str):
    if arch not in PERMUTED_ARCHITECTURES:
        return lora_b
    heads = base["num_attention_heads"]
    if ".attn_q." in gguf_name:
        return permute_for_llama_rope(lora_b, heads)
    if ".attn_k." in gguf_name:
        return permute_for_llama_rope(lora_b, base.get("num_key_value_heads") or heads)
    return lora_b


def _module_order(module: str):
    parts = module.split(".")
    layer = next((int(part) for part in parts if part.isdigit()), -1)
    return (layer, module)


def _base_config(base_dir: Path) -> dict:
    path = Path(base_dir) / "config.json"
    if not path.is_file():
        raise TunesmithError(f"{base_dir}: no config.json; the LoRA GGUF needs the base model's Hugging Face folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") not in GGUF_ARCHITECTURES:
        raise TunesmithError(f"{base_dir}: LoRA GGUF export supports the model types {', '.join(GGUF_ARCHITECTURES)}; "
                             f"this model is {config.get('model_type')!r}")
    return config


def _write_atomic(writer, out_path: Path) -> str:
    """Write to a hidden temp file beside `out_path`, fsync, rename; nothing half-written is left on failure."""
    with staged_gguf(writer, out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        return finish_gguf_file(writer, tmp, out_path)
