"""Memory planner: what full, LoRA and QLoRA fine-tuning of a model need, and whether that fits a device.

Weights, gradients and optimizer states follow from parameter counts. Activations (and the transient tensors of the
backward pass) are not guessed from a formula: one training step of the real architecture is traced on fake tensors
(shapes and dtypes only, no memory), with the same autocast, LoRA layers and loss as training, and the peak of live
tensor bytes is recorded.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.train.cpu_attention import use_cpu_attention
from tunesmith.train.head_loss import HeadWorkspace, linear_cross_entropy
from tunesmith.train.model_setup import speed_up_adapter_layers

GIB = 1024**3
MODES = ("full", "lora", "qlora")
# NF4 stores 4 bits per weight plus one fp32 absmax per 64-weight block, itself 8-bit quantized (double quantization).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32 like the parameters they follow
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # CUDA context, cuBLAS workspace and kernels, before any tensor
# Sequences per example that preference methods run with gradients: DPO concatenates chosen and rejected, KTO adds
# a mismatched KL batch; the reference pass runs without gradients and saves nothing.
SEQUENCES_PER_EXAMPLE = {"dpo": 2, "kto": 2}


@dataclass
class MemoryPlan:
    """Estimated peak memory of one fine-tuning mode, by component, in bytes."""

    mode: str
    components: dict[str, int]
    trainable: int
    available: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    memory: int | None  # bytes available for training, None when unknown

    @property
    def label(self) -> str:
        size = f"{self.memory / GIB:.0f} GiB" if self.memory else "unknown size"
        return f"{self.kind} ({size})"


def parse_device(spec: str) -> Device:
    """`cpu` (this machine's RAM), `cuda` (this machine's GPU) or `cuda:80GB` / `cpu:16GB` (a device of that size)."""
    match = re.fullmatch(r"(cpu|cuda|gpu)(?::(\d+(?:\.\d+)?)\s*(gb|gib|g))?", spec.strip().lower())
    if not match:
        raise TunesmithError(f"--device {spec!r}: expected cpu, cuda, or a size such as cuda:80GB or cpu:16GB")
    kind = "cuda" if match.group(1) in ("cuda", "gpu") else "cpu"
    if match.group(2):
        return Device(kind, int(float(match.group(2)) * GIB))
    return Device(kind, _local_memory(kind))


def plan_memory(config: RunConfig, device: Device, modes: tuple[str, ...] | None = None) -> list[MemoryPlan]:
    """One plan per mode (full, LoRA, QLoRA, and DoRA when configured) at `data.max_length` x `train.batch_size`."""
    import torch
    from transformers import AutoConfig

    from tunesmith.models import resolve_base_model
    from tunesmith.machine import pick_precision

    source = resolve_base_model(config.base_model)
    model_config = _from_pretrained_config(AutoConfig, source)
    precision = pick_precision(config.train.precision) if device.kind == "cpu" or torch.cuda.is_available() else "bf16"
    seq_len = min(config.data.max_length, getattr(model_config, "max_position_embeddings", None) or 10**9)
    runtime = _runtime_bytes(device, source)
    modes = modes or MODES + (("dora",) if config.train.adapter == "dora" else ())
    plans, traced = [], {}
    for mode in modes:
        traced_mode = "lora" if mode == "qlora" else mode
        if traced_mode not in traced:
            traced[traced_mode] = trace_training_step(model_config, traced_mode, config, seq_len, precision,
                                                      cpu_attention=device.kind == "cpu")
        counts, step_peak = traced[traced_mode]
        plans.append(_plan(mode, counts, step_peak, runtime, device, precision, config.train.method))
    return plans


def trace_training_step(model_config, mode: str, config: RunConfig, seq_len: int, precision: str,
                        cpu_attention: bool = False) -> tuple[dict, int]:
    """Parameter counts, and the peak bytes of tensors created by one forward + backward, traced on fake tensors
    (with the attention training will use: tunesmith's CPU attention when `cpu_attention` and it is enabled)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _empty_model(model_config, mode, config)
    speed_up_adapter_layers(model, mode, precision)
    if cpu_attention and config.train.attention == "auto":
        use_cpu_attention(model)
    counts = _parameter_counts(model)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _materialize_fake(model)
        model.train()
        if config.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with _LiveBytes() as live:
            # As in training: autocast around the forward only, backward outside it.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = _micro_batch_loss(model, config, seq_len)
            loss.backward()
    return counts, live.peak


def _micro_batch_loss(model, config: RunConfig, seq_len: int):
    """The loss of one micro-batch of full-length examples, computed the way the configured method computes it."""
    import torch

    train = config.train
    if train.method != "sft":
        # TRL's DPO/KTO: chosen and rejected (or the KL batch) side by side, padded, logits at every position.
        ids = torch.zeros(train.batch_size * SEQUENCES_PER_EXAMPLE[train.method], seq_len, dtype=torch.long)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    # tunesmith's SFT loop: one padding-free row (or padded rows), the decoder, then the fused LM head + loss on
    # trained tokens only; here every token is trained, the worst case.
    if train.packing:
        ids = torch.zeros(1, train.batch_size * seq_len, dtype=torch.long)
        inputs = {"position_ids": torch.arange(seq_len).repeat(train.batch_size)[None]}
    else:
        ids = torch.zeros(train.batch_size, seq_len, dtype=torch.long)
        inputs = {"attention_mask": torch.ones_like(ids)}
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(input_ids=ids, use_cache=False, **inputs).last_hidden_state
    return linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), causal_lm.get_output_embeddings().weight,
                                ids[:, 1:].reshape(-1), HeadWorkspace())


def _plan(mode: str, counts: dict, step_peak: int, runtime: int, device: Device, precision: str,
          method: str) -> MemoryPlan:
    frozen_linear = counts["linear"] if mode == "qlora" else 0
    weights = (counts["base"] - frozen_linear) * (2 if mode == "qlora" else 4) + frozen_linear * NF4_BYTES_PER_PARAM
    notes = []
    if mode == "full" and method != "sft":
        weights *= 2  # TRL keeps a frozen copy of the fully tuned model as the reference
        notes.append(f"{method} keeps a frozen reference copy of the weights")
    trainable = counts["base"] if mode == "full" else counts["adapter"]
    adapter = 0 if mode == "full" else counts["adapter"] * 4
    gradients = trainable * 4
    components = {
        "weights": int(weights),
        "lora adapter": adapter,
        "gradients": gradients,
        "optimizer states": trainable * 4 * ADAMW_STATES,
        # The traced peak includes the gradients that exist at that moment; count them once.
        "activations": max(step_peak - gradients, 0),
        "runtime": runtime,
    }
    if mode == "qlora" and device.kind == "cpu":
        notes.append("QLoRA needs CUDA (bitsandbytes 4-bit kernels); on CPU use LoRA")
    if mode == "qlora":
        notes.append("NF4 base weights (double-quantized), bf16 compute")
    elif precision == "bf16":
        notes.append("bf16 autocast over fp32 weights")
    return MemoryPlan(mode, components, trainable, available=device.memory, notes=notes)


def _empty_model(model_config, mode: str, config: RunConfig):
    """The architecture with the adapter layers training would add, on the meta device (no memory)."""
    import torch
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.train.model_setup import peft_lora_config

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.tie_weights()  # tying does not happen under init_empty_weights
    if mode == "full":
        return model
    with init_empty_weights():
        return get_peft_model(model, peft_lora_config(config.train.lora, mode))


def _parameter_counts(model) -> dict:
    """Base parameters (tied ones once), adapter parameters, and the base weights inside linear layers (4-bit in QLoRA)."""
    import torch

    seen, base, adapter, linear = set(), 0, 0, 0
    output_embedding = model.get_output_embeddings()
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if "lora_" in name:
                adapter += param.numel()
                continue
            base += param.numel()
            # bitsandbytes quantizes every nn.Linear except the output head
            is_head = output_embedding is not None and param is getattr(output_embedding, "weight", None)
            if isinstance(module, torch.nn.Linear) and param_name == "weight" and not is_head:
                linear += param.numel()
    return {"base": base, "adapter": adapter, "linear": linear}


def _materialize_fake(model) -> None:
    """Swap meta parameters and buffers for fake CPU tensors (call inside FakeTensorMode), keeping ties and requires_grad."""
    import torch

    replaced = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in replaced:
                    fake = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                    replaced[id(param)] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
                module._parameters[name] = replaced[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu")


class _LiveBytes:
    """Dispatch mode that tracks the bytes of every tensor storage created while it is active, and their peak."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._track(out)
                return out

        self._mode = _Mode()
        self._alive: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _track(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            key = id(storage)
            if key in self._alive and self._alive[key]() is not None:
                continue
            size = storage.nbytes()
            self._alive[key] = weakref.ref(storage, lambda _, k=key, n=size: self._release(k, n))
            self.current += size
            self.peak = max(self.peak, self.current)

    def _release(self, key: int, size: int) -> None:
        self._alive.pop(key, None)
        self.current -= size

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _runtime_bytes(device: Device, source: Path | str) -> int:
    """Memory used before any tensor: on CPU, this process's resident size once it holds what training loads first."""
    if device.kind == "cuda":
        return CUDA_CONTEXT_BYTES
    import peft  # noqa: F401  (imported for its memory, like the training process does)
    import psutil
    from transformers import Trainer  # noqa: F401

    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(source)  # noqa: F841  (held while measuring: training holds it too)
    return psutil.Process().memory_info().rss


def _local_memory(kind: str) -> int | None:
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TunesmithError("--device cuda: no CUDA GPU here; give its size instead, e.g. --device cuda:80GB")
        return torch.cuda.get_device_properties(0).total_memory
    import psutil

    return psutil.virtual_memory().total


def _from_pretrained_config(cls, source: Path | str):
    try:
        return cls.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"could not read the model config of {source} ({str(exc).splitlines()[0]})") from None
