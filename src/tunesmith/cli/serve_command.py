"""`tunesmith serve`: the settings, the served versions, and the engine that serves them."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import TunesmithError


def serve_command(references: list[str], config: Path | None, base: bool | None, engine: str | None,
                  host: str | None, port: int | None) -> int:
    """Serve `references` (or the config's `serve.models`) until interrupted; the exit code."""
    from tunesmith.config import ServeConfig, load_run_config, load_serve_config
    from tunesmith.serve.app import check_port_number

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
    host, engine = host or settings.host, engine or settings.engine
    port = settings.port if port is None else port
    check_port_number(port)
    if engine == "native":
        from tunesmith.serve.app import run_server

        extend = fine_tuning_api(settings.jobs) if settings.jobs.enabled else None
        # An untrained run is served as its base alone only when --base asked for bases in so many words.
        run_server(references, settings.model_copy(update={"host": host, "port": port}), serve_base, extend=extend,
                   untrained_as_base=base is True)
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


def fine_tuning_api(settings):
    """The server extension that serves OpenAI's fine-tuning API: jobs run beside the server, each in its own
    process, and every model a job makes (and each checkpoint) is served at once, to the key that owns it."""
    from tunesmith.jobs.routes import jobs_router
    from tunesmith.jobs.store import JobStore
    from tunesmith.jobs.supervisor import JobsService, ModelReady
    from tunesmith.serve.app import ServerExtension

    def extend(engine, gateway) -> ServerExtension:
        def serve(ready: ModelReady) -> None:
            gateway.owners[ready.name] = ready.owner  # owned before it is visible
            engine.load(ready.reference, name=ready.name)

        store = JobStore()
        service = JobsService(store, settings, on_model_ready=serve)
        try:
            service.start()
        except TunesmithError as exc:  # a second server on this home: it serves chat, the first one runs jobs
            store.close()
            print(f"Fine-tuning API off in this server: {exc}", flush=True)
            return ServerExtension()
        for ready in service.models_ready():  # what earlier jobs made, before the server answers
            try:
                serve(ready)
            except TunesmithError as exc:
                print(f"  {ready.name}: not served ({exc})", flush=True)

        def stop() -> None:
            service.stop()
            store.close()

        return ServerExtension([jobs_router(service)], {"/v1/files": service.max_file_bytes}, stop)

    return extend
