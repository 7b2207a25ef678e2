"""`tunesmith serve --engine llamacpp`: the served versions through llama.cpp's `llama-server`, for users who run
llama.cpp already.

Adapters on one base become one process: `llama-server -m BASE.gguf --lora A.gguf --lora B.gguf
--lora-init-without-apply`, the base in GGUF (`registry.gguf_export`) and each adapter as a llama.cpp LoRA GGUF
(`registry.gguf_lora_export`), written once into a cache under the tunesmith home. Adapters load switched off; a
request switches one on with the body field `"lora": [{"id": ID, "scale": 1.0}]` (adapters it does not list are
off), where ID is the adapter's position among the `--lora` flags. llama-server does not route by the request's
`model`, so each launch carries `lora_ids` ({served name: id}) and `lora_field(name)` builds that field; routing by
name in front of llama-server is for a later proxy. A fully fine-tuned version is a model GGUF served by a process
of its own on the next port.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.serve.external_engine import plan_processes, supervise
from tunesmith.serve.targets import ServedTarget

GGUF_CACHE_VERSION = "1"
"""Part of every cached file's key: bump it when the GGUF writers change what they write."""
BUILD_HINT = (
    "build llama-server with cmake from llama.cpp's sources, e.g. the copy in the llama-cpp-python sdist: "
    "`pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz && "
    "cmake -S llama_cpp_python-*/vendor/llama.cpp -B llama-build -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF && "
    "cmake --build llama-build --target llama-server -j`, then put llama-build/bin on PATH "
    "(`make llamacpp` installs only the Python binding, which has no server)")


@dataclass(frozen=True)
class GgufFiles:
    """The GGUF files the processes load: each base's model file (by base key), and per served name its LoRA
    GGUF (an adapter) or its own model GGUF (a fully fine-tuned version)."""

    bases: dict[str, Path]
    models: dict[str, Path]


@dataclass(frozen=True)
class LlamaServerLaunch:
    """One llama-server process: its command line, its port, the names it serves, and each adapter's LoRA id."""

    argv: list[str]
    port: int
    served_names: list[str]
    lora_ids: dict[str, int] = field(default_factory=dict)

    def lora_field(self, served_name: str) -> list[dict]:
        """The request body's `lora` value that makes this process answer as `served_name`: every adapter listed,
        the named one at scale 1, so nothing is inherited from the server's global scales."""
        if served_name not in self.served_names:
            raise TunesmithError(f"model {served_name!r} is not served on port {self.port}; "
                                 f"it serves: {', '.join(self.served_names)}")
        return [{"id": i, "scale": 1.0 if name == served_name else 0.0} for name, i in self.lora_ids.items()]


def llama_server_commands(targets: list[ServedTarget], files: GgufFiles, host: str, port: int, base: bool = True,
                          extra_args: tuple[str, ...] | list[str] = (),
                          binary: str = "llama-server") -> list[LlamaServerLaunch]:
    """The llama-server commands that serve `targets` from `files` (see `export_gguf_files`); `extra_args` go to
    each (e.g. `-ngl 99` to offload to a GPU, `-c 8192`)."""
    plan = plan_processes(targets, port, base)
    ports = iter(plan.ports())
    launches = []
    for group in plan.shared:
        lora_ids = {target.name: i for i, target in enumerate(group.adapters)}
        loras = [arg for target in group.adapters for arg in ("--lora", _flag_path(files.models[target.name]))]
        argv = [binary, "-m", _flag_path(files.bases[group.key]), "--alias", group.name, *loras,
                "--lora-init-without-apply"]
        launches.append(_launch(argv, host, next(ports), [group.name, *lora_ids], lora_ids, extra_args))
    for target in plan.full:
        argv = [binary, "-m", _flag_path(files.models[target.name]), "--alias", target.name]
        launches.append(_launch(argv, host, next(ports), [target.name], {}, extra_args))
    for group in plan.base_only:
        argv = [binary, "-m", _flag_path(files.bases[group.key]), "--alias", group.name]
        launches.append(_launch(argv, host, next(ports), [group.name], {}, extra_args))
    return launches


def launch_llama_server(targets: list[ServedTarget], host: str, port: int, base: bool = True,
                        extra_args: tuple[str, ...] | list[str] = (), dtype: str = "f16",
                        binary: str = "llama-server") -> int:
    """Write (or reuse) the GGUF files, then serve `targets` with llama-server until interrupted; returns the exit
    code of the process that ended first."""
    if shutil.which(binary) is None:
        raise TunesmithError(f"--engine llamacpp: {binary} is not on PATH; {BUILD_HINT}")
    files = export_gguf_files(targets, dtype=dtype, base=base)
    launches = llama_server_commands(targets, files, host, port, base, extra_args, binary)
    for launch in launches:
        print(f"llama-server on port {launch.port}: {', '.join(launch.served_names)}", flush=True)
        for name, lora_id in launch.lora_ids.items():
            print(f"  {name}: send \"lora\": {launch.lora_field(name)} (adapter id {lora_id})", flush=True)
    return supervise([launch.argv for launch in launches])


def export_gguf_files(targets: list[ServedTarget], cache_dir: Path | None = None, dtype: str = "f16",
                      base: bool = True) -> GgufFiles:
    """The GGUF files for `targets`, written into `cache_dir` (default: the tunesmith home's serve/gguf) the first
    time and reused after; every run's weights are checked against their training hash first."""
    from tunesmith.registry.gguf_export import write_gguf
    from tunesmith.registry.gguf_lora_export import write_lora_gguf

    cache = Path(cache_dir) if cache_dir is not None else _default_cache()
    plan = plan_processes(targets, 0, base)
    bases, models = {}, {}
    for group in plan.shared + plan.base_only:
        folder = _local_base(group.source)
        name = f"base-{_key(_folder_fingerprint(folder), dtype)}-{dtype}.gguf"
        bases[group.key] = _cached(cache / name, partial(write_gguf, folder, dtype=dtype))
    lora_dtype = "f32" if dtype == "f32" else "f16"
    for group in plan.shared:
        folder = _local_base(group.source)
        for target in group.adapters:
            key = _key(target.run.verify_weights(), _folder_fingerprint(folder), lora_dtype)
            name = f"lora-{key}-{lora_dtype}.gguf"
            models[target.name] = _cached(cache / name, partial(write_lora_gguf, target.run.weights_dir, folder,
                                                                dtype=lora_dtype))
    for target in plan.full:
        name = f"model-{_key(target.run.verify_weights(), dtype)}-{dtype}.gguf"
        models[target.name] = _cached(cache / name, partial(write_gguf, target.run.weights_dir, dtype=dtype))
    return GgufFiles(bases, models)


def _launch(argv, host, port, names, lora_ids, extra_args) -> LlamaServerLaunch:
    # --jinja: the GGUF's own chat template, rendered as Jinja, so prompts look as they did in training.
    argv = [*argv, "--jinja", "--host", host, "--port", str(port), *extra_args]
    return LlamaServerLaunch(argv, port, names, lora_ids)


def _flag_path(path: Path) -> str:
    """llama-server splits `-m`/`--lora` values at commas, so a path with one cannot be passed."""
    text = str(Path(path).resolve())
    if "," in text:
        raise TunesmithError(f"{text}: llama-server cannot load a file whose path has a comma; "
                             "set TUNESMITH_HOME to a folder without one")
    return text


def _cached(path: Path, write) -> Path:
    """`path` if an earlier launch wrote it (the writers rename a file into place only when it is complete), else
    `write(out_path=path)`."""
    if not path.is_file():
        from rich.console import Console

        with Console(stderr=True).status(f"writing {path.name} for llama.cpp (once)"):
            write(out_path=path)
    return path


def _default_cache() -> Path:
    from tunesmith.models import tunesmith_home

    return tunesmith_home() / "serve" / "gguf"


def _local_base(source: str) -> Path:
    """The base model's folder: as given, or the Hub snapshot training downloaded."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))


def _folder_fingerprint(folder: Path) -> str:
    """Name, size and modification time of the folder's files: cheap enough for every launch of a many-gigabyte
    base (hashing it would not be), and changes whenever a file is replaced."""
    entries = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in Path(folder).iterdir()
                     if p.is_file() and not p.name.startswith("."))
    return "\n".join(entries)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join((GGUF_CACHE_VERSION, *parts)).encode()).hexdigest()[:16]
