"""The coordinator's FastAPI app: routes, health, metrics, lifecycle."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from idlegrid import PROTOCOL_VERSION, __version__
from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator import http_errors, schemas
from idlegrid.coordinator.dashboard import routes as routes_dashboard
from idlegrid.coordinator.dashboard.data import WEB, Dashboard
from idlegrid.coordinator.db.store import Store, migrate
from idlegrid.coordinator.edge import BodyGuard
from idlegrid.coordinator.inference import routes as routes_openai
from idlegrid.coordinator.inference.service import Grid
from idlegrid.coordinator.market import routes as routes_market
from idlegrid.coordinator.nodes import admin_routes as routes_admin
from idlegrid.coordinator.nodes import routes as routes_nodes
from idlegrid.coordinator.training import routes as routes_jobs
from idlegrid.coordinator.trust import routes as routes_trust


def create_app(
    settings: CoordinatorSettings | None = None, clock: Callable[[], float] = time.time
) -> FastAPI:
    """Build the app; the database is migrated to the newest schema on start-up."""
    settings = settings or CoordinatorSettings()
    settings.ensure_operator_key()
    url = settings.resolved_database_url()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate(url)
        store = Store(url, clock)
        grid = Grid(settings, store, clock)
        app.state.grid = grid
        await grid.refresh_nodes()  # routing and the market start from what the store knows
        app.state.dashboard = Dashboard(grid)
        grid.start()
        try:
            yield
        finally:
            await grid.stop()
            store.close()

    app = FastAPI(title="idlegrid coordinator", version=__version__, lifespan=lifespan)
    http_errors.install(app)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes,
                       large_bytes=settings.max_checkpoint_body_bytes)
    # Last added runs first: a foreign Host (DNS rebinding) is refused before anything.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.host_names())
    app.include_router(routes_openai.router)
    app.include_router(routes_nodes.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_market.router)
    app.include_router(routes_trust.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_dashboard.router)
    # The dashboard's own CSS/JS and the vendored chart library: nothing from a CDN.
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")

    @app.get("/healthz", tags=["health"], response_model=schemas.Health)
    async def healthz() -> dict[str, Any]:
        """The process is up."""
        return {"ok": True, "version": __version__, "protocol_version": PROTOCOL_VERSION}

    @app.get("/readyz", tags=["health"], response_model=schemas.Ready,
             responses=schemas.READY_RESPONSES)
    async def readyz(request: Request) -> Response:
        """The database answers and at least the schema is in place."""
        grid: Grid = request.app.state.grid
        try:
            await grid.db(grid.store.ping)
        except Exception as exc:  # any database failure means "not ready", with the reason
            return JSONResponse({"ok": False, "reason": str(exc)}, status_code=503)
        return JSONResponse({"ok": True})

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse,
             responses=schemas.METRICS_RESPONSES)
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        grid: Grid = request.app.state.grid
        return Response(grid.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
