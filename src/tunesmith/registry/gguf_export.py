"""Export a plain Hugging Face causal-LM folder (config.json + safetensors + tokenizer) to one GGUF file for
llama.cpp / Ollama, the way llama.cpp's convert_hf_to_gguf.py does for the architectures we support.

Tensor types follow the converter: 1-D tensors (norms, biases) stay F32; a tensor whose rows do not split into
whole quantization blocks falls back to F16 (listed in the result's `fallbacks`). In q4_0 the output projection
(`output.weight`, or `token_embd.weight` when the embeddings are tied) is written as q8_0, because
llama-quantize keeps that one tensor at higher precision (it picks q6_k, which gguf-py cannot write).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.registry.gguf_tokenizer import add_tokenizer
from tunesmith.registry.hashing import file_sha256
from tunesmith.registry.run_dir import apply_umask, fsync_path

# Hugging Face model_type -> GGUF architecture. Mistral is llama to llama.cpp (same tensors, same rope permute).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTED_ARCHITECTURES = {"llama"}  # llama.cpp's llama rope wants q/k rows regrouped; qwen2 uses neox rope as is
DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
SKIPPED_TENSORS = re.compile(r"rotary_emb\.inv_freq$")


@dataclass
class PlannedTensor:
    """One tensor to write: where it comes from, its GGUF name and logical shape (rows, cols), and its type."""

    source: str
    file: Path
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    fallback: str | None = None

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, type_size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * type_size


def write_gguf(model_dir: Path, out_path: Path, dtype: str, on_tensor=None) -> dict:
    """Convert `model_dir` into the GGUF file `out_path` (written atomically) with weights in `dtype`
    (f32, f16, bf16, q8_0, q4_0); calls `on_tensor(name)` after each tensor. Returns what was written."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    if dtype not in DTYPES:
        raise TunesmithError(f"GGUF dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    config = _load_config(model_dir)
    arch = GGUF_ARCHITECTURES[config.model_type]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = plan_tensors(model_dir, arch, dtype, tied, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    add_hparams(writer, config, model_dir.name, dtype)
    tokenizer_info = add_tokenizer(writer, model_dir, config.vocab_size)
    rope_freqs = llama3_rope_factors(config) if arch == "llama" else None
    for tensor in plan:
        writer.add_tensor_info(tensor.name, tensor.shape, _float32(), tensor.nbytes, raw_dtype=tensor.qtype)
    if rope_freqs is not None:
        writer.add_tensor_info("rope_freqs.weight", rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
    digest = _write_atomic(writer, out_path, plan, config, arch, rope_freqs, on_tensor)
    return {
        "path": str(out_path), "dtype": dtype, "bytes": out_path.stat().st_size, "sha256": digest,
        "architecture": arch, "tensors": len(plan) + (rope_freqs is not None),
        "fallbacks": [tensor.fallback for tensor in plan if tensor.fallback], **tokenizer_info,
    }


def _load_config(model_dir: Path):
    from transformers import AutoConfig

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise TunesmithError(f"{model_dir}: no config.json; point the export at a Hugging Face model folder")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise TunesmithError(f"{model_dir}: GGUF export supports the model types {', '.join(GGUF_ARCHITECTURES)}; "
                             f"this model is {model_type!r}")
    return AutoConfig.from_pretrained(str(model_dir))




def add_hparams(writer, config, name: str, dtype: str) -> None:
    """The shape and rope of the model, under llama.cpp's keys for its architecture."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_parameters(config) -> dict:
    """rope_theta and scaling from a transformers 5 config (`rope_parameters`) or an older one
    (`rope_theta` + `rope_scaling`); raises for scaling llama.cpp cannot be told about here."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params = dict(params.get("full_attention", params))
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    rope_type = params.get("rope_type") or "default"
    supported = ("default", "linear", "llama3") if config.model_type == "llama" else ("default", "linear")
    if rope_type not in supported:
        raise TunesmithError(f"rope scaling {rope_type!r} cannot be exported to GGUF here; "
                             f"supported: {', '.join(supported)}")
    return {**params, "rope_type": rope_type}


def llama3_rope_factors(config):
    """The per-frequency factors llama.cpp reads from `rope_freqs.weight` for llama3 rope scaling (as
    convert_hf_to_gguf's LlamaModel writes them); None for other rope types."""
    import numpy as np

    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _file_type(dtype: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]


def plan_tensors(model_dir: Path, arch: str, dtype: str, tied: bool, block_count: int) -> list[PlannedTensor]:
    """Every tensor of the safetensors files with its GGUF name and type, in block order."""
    import gguf
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise TunesmithError(f"{model_dir}: no *.safetensors weights (save the merged model with save_pretrained)")
    model_arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    plan = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for source in handle.keys():
                if SKIPPED_TENSORS.search(source) or (tied and source == "lm_head.weight"):
                    continue
                shape = tuple(handle.get_slice(source).get_shape())
                name = _gguf_name(source, model_arch, block_count)
                qtype, fallback = tensor_type(name, shape, dtype, tied)
                plan.append(PlannedTensor(source, file, name, shape, qtype, fallback))
    names = {tensor.name for tensor in plan}
    if not tied and "output.weight" not in names:
        raise TunesmithError(f"{model_dir}: config says the embeddings are not tied, but there is no lm_head.weight")
    return sorted(plan, key=_block_order)


def _gguf_name(source: str, model_arch, block_count: int) -> str:
    import gguf

    stem, _, suffix = source.rpartition(".")
    name = gguf.get_tensor_name_map(model_arch, block_count).get_name(stem)
    if name is None or suffix not in ("weight", "bias"):
        raise TunesmithError(f"tensor {source!r} has no GGUF name for {gguf.MODEL_ARCH_NAMES[model_arch]}; "
                             "is this a plain (merged) causal-LM folder?")
    return f"{name}.{suffix}"


def tensor_type(name: str, shape: tuple[int, ...], dtype: str, tied: bool):
    """The GGML type a tensor is written in, and a note when it had to fall back to F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) <= 1:
        return Q.F32, None
    target = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[dtype]
    if target == Q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        target = Q.Q8_0
    block = GGML_QUANT_SIZES[target][0]
    if shape[-1] % block:
        return Q.F16, (f"{name}: row length {shape[-1]} is not a multiple of the {target.name} block ({block}); "
                       "written as F16")
    return target, None


def _block_order(tensor: PlannedTensor):
    match = re.match(r"blk\.(\d+)\.", tensor.name)
    if match:
        return (1, int(match.group(1)), tensor.name)
    return (0 if tensor.name.startswith("token_embd") else 2, 0, tensor.name)


def permute_for_llama_rope(weights, n_head: int):
    """convert_hf_to_gguf's LlamaModel.permute: regroup each head's q/k rows from halves (Hugging Face's rotate_half)
    to interleaved pairs (llama.cpp's rope); transformers' GGUF loader undoes exactly this."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _converted(tensor: PlannedTensor, weights, config, arch: str):
    """The bytes to write for one tensor: permuted for llama's rope where needed, then cast or quantized."""
    import gguf

    if arch in PERMUTED_ARCHITECTURES:
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if ".attn_q." in tensor.name:
            weights = permute_for_llama_rope(weights, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weights = permute_for_llama_rope(weights, kv_heads)
    return gguf.quants.quantize(weights, tensor.qtype)


def _write_atomic(writer, out_path: Path, plan, config, arch: str, rope_freqs, on_tensor) -> str:
    """Write header, metadata and tensors to a hidden temp file beside `out_path`, fsync, rename; on any error
    or interrupt the temp file is removed. Returns the file's sha256."""
    import torch
    from safetensors import safe_open

    with staged_gguf(writer, out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ExitStack() as stack:
            handles = {}
            for tensor in plan:
                if tensor.file not in handles:
                    handles[tensor.file] = stack.enter_context(safe_open(str(tensor.file), framework="pt"))
                weights = handles[tensor.file].get_tensor(tensor.source).to(torch.float32).numpy()
                writer.write_tensor_data(_converted(tensor, weights, config, arch))
                if on_tensor is not None:
                    on_tensor(tensor.name)
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs)
        return finish_gguf_file(writer, tmp, out_path)



@contextmanager
def staged_gguf(writer, out_path: Path):
    """A hidden temp file beside `out_path` for `writer` to fill; on any error or interrupt the writer is closed and
    the temp file removed, so nothing half-written is left."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def finish_gguf_file(writer, tmp: Path, out_path: Path) -> str:
    """Flush and fsync a fully written GGUF temp file, then move it into place; its sha256."""
    handle = writer.fout[0]
    handle.flush()
    os.fsync(handle.fileno())
    writer.close()
    apply_umask(tmp, directory=False)
    digest = file_sha256(tmp)
    os.replace(tmp, out_path)
    fsync_path(out_path.parent)
    return digest


def _float32():
    import numpy as np

    return np.dtype(np.float32)
