"""`tunesmith serve`: the settings, the served versions, and the engine that serves them."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import TunesmithError


def serve_command(references: list[str], config: Path | None, base: bool | None, engine: str | None,
                  host: str | None, port: int | None) -> int:
    """Serve `references` (or the config's `serve.models`) until interrupted; the exit code."""
    from tunesmith.config import ServeConfig, load_run_config, load_serve_config

    if config is not None:
        settings = load_serve_config(config)
    elif references and (Path(references[0]) / "config.yaml").is_file():
        settings = load_run_config(references[0]).serve  # one run served as before: its own serve section
    else:
        settings = ServeConfig()
    references = list(references) or settings.models
    if not references:
        raise TunesmithError("nothing to serve: name run directories or registered versions (NAME@ALIAS), "
                             "or list them under serve.models in the file given to --config")
    serve_base = settings.serve_base if base is None else base
    host, port, engine = host or settings.host, port or settings.port, engine or settings.engine
    if engine == "native":
        from tunesmith.serve.app import run_server

        run_server(references, settings.model_copy(update={"host": host, "port": port}), serve_base)
        return 0
    from tunesmith.serve.targets import resolve_targets

    targets = resolve_targets(references)
    if engine == "vllm":
        from tunesmith.serve.vllm_command import launch_vllm

        return launch_vllm(targets, host, port, serve_base, ())
    if engine == "llamacpp":
        from tunesmith.serve.llamacpp_command import launch_llama_server

        return launch_llama_server(targets, host, port, serve_base)
    raise TunesmithError(f"--engine {engine}: unknown; use native, vllm or llamacpp")
