"""Admin routes: what is served, load a version, unload a name, while the server runs. Access control is the
app's middleware (an admin-scoped key on /admin/*)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from tunesmith.serve.engine import ServingEngine


class LoadRequest(BaseModel):
    model: str
    """A run directory or registry reference: NAME@VERSION, NAME@ALIAS."""


class ServedEntry(BaseModel):
    name: str
    """The served name clients send as `model`."""
    engine_name: str
    """The version behind it (`orders@3`)."""
    registry_model: str | None
    registry_version: str | None
    follows_alias: bool
    parent: str | None
    root: str


class ServedList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedEntry]


def admin_router(engine: ServingEngine) -> APIRouter:
    """`GET /admin/models`, `POST /admin/models` {"model": REFERENCE}, `DELETE /admin/models/{name}` over `engine`."""
    router = APIRouter(prefix="/admin")

    @router.get("/models")
    def list_served() -> ServedList:
        return served_list(engine)

    @router.post("/models")
    async def load(request: LoadRequest) -> ServedList:
        await run_in_threadpool(engine.load, request.model)  # reads and verifies weights: seconds to minutes
        return served_list(engine)

    @router.delete("/models/{name:path}")
    def unload(name: str) -> ServedList:
        engine.unload(name)
        return served_list(engine)

    return router


def served_list(engine: ServingEngine) -> ServedList:
    models = engine.models
    entries = [ServedEntry(name=name, engine_name=models[name].name, registry_model=models[name].registry_model,
                           registry_version=models[name].registry_version, follows_alias=name in engine.aliases,
                           parent=models[name].parent, root=models[name].root)
               for name in engine.list_models() if name in models]
    return ServedList(data=entries)
