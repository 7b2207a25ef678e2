"""More than one process: launching `--nproc N` workers with torchrun, and the accelerate setup for DDP / FSDP / DeepSpeed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tunesmith.errors import TunesmithError
from tunesmith.machine import available_cores

PRECISION_TO_ACCELERATE = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def launched_world_size() -> int:
    """Processes in this job, as torchrun / accelerate launch announce it (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def launch_processes(nproc: int, command: list[str]) -> int:
    """Re-run `tunesmith <command>` in `nproc` processes under torchrun (gloo on CPU, NCCL on GPUs); their exit code."""
    if nproc < 1:
        raise TunesmithError(f"--nproc {nproc}: give a process count of 1 or more")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tunesmith", *command]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(_threads_per_process(nproc)))}
    process = subprocess.Popen(argv, env=env)
    # A SIGTERM to the process group (`timeout`, schedulers) reaches torchrun too, which hands it to the workers:
    # they save a checkpoint and exit. This process only waits to return their exit code; stopping on the signal
    # (or passing torchrun a second one, which cuts its shutdown short) would leave the workers orphaned mid-save.
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _threads_per_process(nproc: int) -> int:
    return max(1, available_cores() // nproc)


def default_threads(requested: int | None) -> int | None:
    """The thread count to use: the request, else this process's share of the cores when several run."""
    if requested:
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return _threads_per_process(local) if local > 1 else None


def make_accelerator(train, precision: str):
    """An accelerate Accelerator for this process: plain, DDP, FSDP or DeepSpeed per `train.distributed`."""
    from accelerate import Accelerator

    plugins = {}
    if launched_world_size() > 1 and train.distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
            state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
    elif launched_world_size() > 1 and train.distributed == "deepspeed":
        plugins["deepspeed_plugin"] = _deepspeed_plugin(train)
    import torch

    if launched_world_size() == 1:
        # accelerate keeps its state process-wide; a second run in the same process (a notebook, a test
        # session, SFT then evaluation) may want another precision, so a single process starts afresh.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=PRECISION_TO_ACCELERATE[precision], cpu=not torch.cuda.is_available(),
                       **plugins)


def _deepspeed_plugin(train):
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise TunesmithError("train.distributed=deepspeed needs DeepSpeed on a CUDA machine: pip install deepspeed") from None
    from accelerate import DeepSpeedPlugin

    if train.deepspeed_config:
        if not train.deepspeed_config.is_file():
            raise TunesmithError(f"train.deepspeed_config: {train.deepspeed_config} not found; give a DeepSpeed JSON file")
        plugin = DeepSpeedPlugin(hf_ds_config=str(train.deepspeed_config))
    else:
        plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=train.grad_accum,
                                 gradient_clipping=train.max_grad_norm or 0.0)
    # tunesmith feeds batches itself (no DataLoader for accelerate to read "auto" values from): fill them in.
    filled = {"train_micro_batch_size_per_gpu": max(1, train.batch_size // launched_world_size()),
              "gradient_accumulation_steps": train.grad_accum, "gradient_clipping": train.max_grad_norm or 0.0}
    for key, value in filled.items():
        if plugin.deepspeed_config.get(key, "auto") == "auto":
            plugin.deepspeed_config[key] = value
    return plugin
