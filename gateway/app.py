"""The gateway's composition root: services, routes, the agent endpoint, the hub's loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from agent.protocol.messages import WS_PATH
from gateway.agent_ws import AgentEndpoint
from gateway.api import agents, files, pairing, runs, tasks, team_models, workflows
from gateway.api.deps import Services, install_error_handlers
from gateway.cloud import CloudRunner
from gateway.config import GatewayConfig
from gateway.events import EventBus
from gateway.hub import Hub
from gateway.storage import LocalStorage, ObjectStorage
from gateway.storage_routes import storage_routes
from gateway.store import Store
from gateway.tasks import TaskService

VERSION = "0.1.0"


def create_app(
    config: GatewayConfig,
    store: Store,
    storage: ObjectStorage,
    *,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the ASGI app; the hub's loop runs for the app's lifespan.

    ``on_ready`` is called once startup is complete (the CLI prints its URL then).
    """
    bus = EventBus(store)
    task_service = TaskService(store, bus)
    hub = Hub(config, store, task_service, storage)
    if config.comfy_cloud_url:
        hub.cloud = CloudRunner(config, store, task_service, storage)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with asyncio.TaskGroup() as group:
            loop = group.create_task(hub.run(), name="hub")
            cloud = group.create_task(hub.cloud.run(), name="cloud") if hub.cloud else None
            if on_ready is not None:
                on_ready()
            try:
                yield
            finally:
                loop.cancel()
                if cloud is not None:
                    cloud.cancel()

    app = FastAPI(
        title="Cyberun reference gateway",
        version=VERSION,
        lifespan=lifespan,
        description="The Cyberun REST API, the agent WebSocket endpoint and a scheduler.",
    )
    app.state.services = Services(
        config=config, store=store, storage=storage, tasks=task_service, hub=hub
    )
    install_error_handlers(app)
    api = APIRouter(prefix="/api/v1")
    for module in (workflows, runs, tasks, files, team_models, agents, pairing):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(pairing.page)
    app.add_api_websocket_route(WS_PATH, AgentEndpoint(hub))
    if isinstance(storage, LocalStorage):
        app.router.routes.extend(storage_routes(storage))

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness of the gateway process."""
        return {"status": "ok"}

    return app
