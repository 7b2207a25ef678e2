"""`tunesmith serve --engine vllm`: the same served names, from the same registry, served by vLLM on a GPU box.

Adapters on one base become one `vllm serve BASE --enable-lora --lora-modules {...} {...}` process, which keeps the
base once and picks the adapter per request by the request's `model`. Each fully fine-tuned version is a
`vllm serve WEIGHTS` process of its own on the next port. Flags as vLLM's OpenAI server takes them
(vllm/entrypoints/openai/cli_args.py): `--lora-modules` takes every module after ONE flag (a repeated flag
replaces the earlier list), each as JSON `{"name", "path", "base_model_name"}`; `--max-lora-rank` is one of
`VLLM_LORA_RANKS` (vllm/config/lora.py). vLLM's PEFT reader (vllm/lora/peft_helper.py) refuses DoRA,
`modules_to_save` and LoRA biases, so those are refused here, before a GPU is touched.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.serve.external_engine import SharedBase, plan_processes, supervise
from tunesmith.serve.targets import ServedTarget

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The `--max-lora-rank` values every recent vLLM accepts (the newest also takes 1)."""
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""The layers vLLM puts LoRA on in the model types of `CHECKED_MODEL_TYPES` (q/k/v and gate/up are packed)."""
CHECKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
GPU_MEMORY_SHARE = 0.9
"""vLLM's default `--gpu-memory-utilization`; split evenly when several processes share the GPU."""
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class VllmLaunch:
    """One `vllm serve` process: its command line, its port, and the model names it answers to."""

    argv: list[str]
    port: int
    served_names: list[str]


def vllm_commands(targets: list[ServedTarget], host: str, port: int, base: bool = True,
                  extra_args: tuple[str, ...] | list[str] = ()) -> list[VllmLaunch]:
    """The `vllm serve` commands that serve `targets` by name; `extra_args` go to each (after ours, so they win).
    With `base`, a base no adapter brings along is served too; a base with adapters is always answerable by its
    name (vLLM serves the model it loaded), whatever `base` says."""
    plan = plan_processes(targets, port, base)
    ports = iter(plan.ports())
    launches = [_shared_launch(group, host, next(ports)) for group in plan.shared]
    launches += [_whole_model_launch(str(t.run.weights_dir), t.name, host, next(ports)) for t in plan.full]
    launches += [_whole_model_launch(group.source, group.name, host, next(ports)) for group in plan.base_only]
    memory = _gpu_memory_args(len(launches), extra_args)
    return [VllmLaunch([*launch.argv, *memory, *extra_args], launch.port, launch.served_names) for launch in launches]


def launch_vllm(targets: list[ServedTarget], host: str, port: int, base: bool = True,
                extra_args: tuple[str, ...] | list[str] = ()) -> int:
    """Serve `targets` with vLLM until interrupted; returns the exit code of the vLLM process that ended first."""
    if shutil.which("vllm") is None:
        raise TunesmithError("--engine vllm: vLLM is not installed here (no `vllm` command on PATH); on a Linux "
                             "machine with an NVIDIA GPU run `pip install vllm`, or serve without --engine")
    for target in targets:
        if target.run.is_trained:
            target.run.verify_weights()  # vLLM reads the files itself: check them against training's hash first
    launches = vllm_commands(targets, host, port, base, extra_args)
    for launch in launches:
        print(f"vllm on port {launch.port}: {', '.join(launch.served_names)}", flush=True)
    return supervise([launch.argv for launch in launches])


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds every adapter's rank."""
    largest = max(ranks)
    for rank in VLLM_LORA_RANKS:
        if rank >= largest:
            return rank
    raise TunesmithError(f"a LoRA rank of {largest} is above vLLM's largest --max-lora-rank "
                         f"({VLLM_LORA_RANKS[-1]}); train with a smaller train.lora.r")


def adapter_rank(target: ServedTarget) -> int:
    """The largest rank in a target's adapter, after checking that vLLM can load the adapter as it is."""
    config = read_vllm_adapter(target)
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def read_vllm_adapter(target: ServedTarget) -> dict:
    """The adapter's `adapter_config.json`, refused with what to do when vLLM could not serve it."""
    folder = Path(target.run.weights_dir)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise TunesmithError(f"{target.name}: {folder} lacks {', '.join(missing)}; vLLM loads a peft adapter "
                             "folder; re-run `tunesmith train` for this run")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise TunesmithError(f"{target.name}: a {config['peft_type']} adapter; vLLM serves LoRA adapters only")
    if config.get("use_dora"):
        raise TunesmithError(f"{target.name}: a DoRA adapter, which vLLM's LoRA serving does not support; serve it "
                             "with the built-in engine (no --engine), or retrain with train.adapter=lora")
    if config.get("modules_to_save"):
        saved = ", ".join(config["modules_to_save"])
        raise TunesmithError(f"{target.name}: the adapter also saves whole modules ({saved}), which vLLM refuses; "
                             "export a merged model (`tunesmith export --format merged`) and serve that, or retrain "
                             "without modules_to_save")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise TunesmithError(f"{target.name}: the adapter trains biases, which vLLM refuses; retrain with bias none")
    _check_lora_modules(target, folder, config)
    return config


def _check_lora_modules(target: ServedTarget, folder: Path, config: dict) -> None:
    """Every adapted layer is one vLLM puts LoRA on (checked for the model types we know; vLLM checks the rest)."""
    if _base_model_type(target) not in CHECKED_MODEL_TYPES:
        return
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        layers = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in handle.keys() if ".lora_" in key}
    unsupported = sorted(layers - VLLM_LORA_MODULES)
    if unsupported:
        raise TunesmithError(f"{target.name}: the adapter adapts {', '.join(unsupported)}, which vLLM does not put "
                             "LoRA on; retrain with train.lora.target_modules=all-linear or a list of "
                             f"{', '.join(sorted(VLLM_LORA_MODULES))}")


def _base_model_type(target: ServedTarget) -> str | None:
    config = Path(target.run.base_source) / "config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None


def _shared_launch(group: SharedBase, host: str, port: int) -> VllmLaunch:
    ranks = [adapter_rank(target) for target in group.adapters]
    modules = [json.dumps({"name": t.name, "path": str(Path(t.run.weights_dir).resolve()),
                           "base_model_name": group.name}) for t in group.adapters]
    argv = ["vllm", "serve", _local_or_hub(group.source), "--served-model-name", group.name, "--enable-lora",
            "--lora-modules", *modules, "--max-lora-rank", str(max_lora_rank(ranks)),
            "--max-loras", str(len(group.adapters)), "--host", host, "--port", str(port)]
    return VllmLaunch(argv, port, [group.name, *(t.name for t in group.adapters)])


def _whole_model_launch(model: str, name: str, host: str, port: int) -> VllmLaunch:
    argv = ["vllm", "serve", _local_or_hub(model), "--served-model-name", name, "--host", host, "--port", str(port)]
    return VllmLaunch(argv, port, [name])


def _local_or_hub(source: str) -> str:
    """A local folder as an absolute path (so the command works from any directory); a Hub id as it is."""
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def _gpu_memory_args(processes: int, extra_args) -> list[str]:
    """Several vLLM processes on one GPU each take their share of it, unless the user said otherwise."""
    if processes < 2 or any(str(arg).startswith("--gpu-memory-utilization") for arg in extra_args):
        return []
    return ["--gpu-memory-utilization", f"{GPU_MEMORY_SHARE / processes:.2f}"]
