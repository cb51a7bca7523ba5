"""The coordinator's FastAPI app and its composition root: builds every service from one
`Context`, wires the domains' reactions to each other's events, includes the routes."""

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
from idlegrid.coordinator.batches import routes as routes_batches
from idlegrid.coordinator.batches.service import Batches
from idlegrid.coordinator.context import Context
from idlegrid.coordinator.dashboard import routes as routes_dashboard
from idlegrid.coordinator.dashboard.data import WEB, Dashboard
from idlegrid.coordinator.db.store import Store, migrate
from idlegrid.coordinator.deps import Services
from idlegrid.coordinator.edge import BodyGuard
from idlegrid.coordinator.events import (
    AnswerFinished,
    LiveNodesChanged,
    NodeRegistered,
    SupplyChanged,
)
from idlegrid.coordinator.files import routes as routes_files
from idlegrid.coordinator.files.service import Files
from idlegrid.coordinator.files.storage import open_store
from idlegrid.coordinator.inference import embed_routes, work_routes
from idlegrid.coordinator.inference import routes as routes_openai
from idlegrid.coordinator.inference.lines import BatchLines
from idlegrid.coordinator.inference.service import Inference
from idlegrid.coordinator.leases import routes as routes_leases
from idlegrid.coordinator.leases.service import Leases
from idlegrid.coordinator.market import routes as routes_market
from idlegrid.coordinator.market.service import Market
from idlegrid.coordinator.nodes import admin_routes as routes_admin
from idlegrid.coordinator.nodes import routes as routes_nodes
from idlegrid.coordinator.nodes.service import Nodes
from idlegrid.coordinator.observe import RequestIds
from idlegrid.coordinator.supervisor import Supervisor
from idlegrid.coordinator.training import routes as routes_jobs
from idlegrid.coordinator.training.jobs import Jobs
from idlegrid.coordinator.trust import routes as routes_trust
from idlegrid.coordinator.trust.audits import Trust
from idlegrid.coordinator.trust.dispute_shell import DisputeShell
from idlegrid.coordinator.trust.hwproofs import HwProofs
from idlegrid.coordinator.trust.payability import audit_summary


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
        svc = compose(Context(settings, store, clock))
        app.state.services = svc
        streams = svc.inference.hub.streams
        svc.metrics.watch_queue(
            lambda: sum(1 for st in list(streams.values()) if st.attempt == 0),
            lambda: sum(1 for st in list(streams.values()) if st.attempt > 0),
        )
        await svc.nodes.refresh()  # routing and the market start from what the store knows
        svc.supervisor.start()
        try:
            yield
        finally:
            await svc.supervisor.stop()
            await svc.batches.stop()
            store.close()

    app = FastAPI(title="idlegrid coordinator", version=__version__, lifespan=lifespan)
    http_errors.install(app)
    # Uploads to /v1/files stream past the guard: the route bounds them as they arrive.
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_body_bytes,
        large_bytes=settings.max_checkpoint_body_bytes,
        streamed=("/v1/files",),
    )
    # Last added runs first: a foreign Host (DNS rebinding) is refused before anything.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.host_names())
    # Outermost: every response, refusals included, gets its id, log line and count.
    app.add_middleware(RequestIds)
    app.include_router(routes_openai.router)
    app.include_router(embed_routes.router)
    app.include_router(routes_files.router)
    app.include_router(routes_batches.router)
    app.include_router(routes_nodes.router)
    app.include_router(work_routes.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_market.router)
    app.include_router(routes_leases.router)
    app.include_router(routes_trust.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_dashboard.router)
    # The dashboard's own CSS/JS and the vendored chart library: nothing from a CDN.
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")

    @app.get("/healthz", tags=["health"], response_model=schemas.Health)
    async def healthz() -> dict[str, Any]:
        """The process is up."""
        return {"ok": True, "version": __version__, "protocol_version": PROTOCOL_VERSION}

    @app.get(
        "/readyz", tags=["health"], response_model=schemas.Ready, responses=schemas.READY_RESPONSES
    )
    async def readyz(request: Request) -> Response:
        """The database answers and at least the schema is in place."""
        svc: Services = request.app.state.services
        try:
            await svc.db(svc.store.ping)
        except Exception as exc:  # any database failure means "not ready", with the reason
            return JSONResponse({"ok": False, "reason": str(exc)}, status_code=503)
        return JSONResponse({"ok": True})

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=PlainTextResponse,
        responses=schemas.METRICS_RESPONSES,
    )
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        svc: Services = request.app.state.services
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def compose(ctx: Context) -> Services:
    """Build every service and wire who reacts to what, in order."""
    trust = Trust(ctx)
    hwproofs = HwProofs(ctx)
    nodes = Nodes(ctx, challenges=hwproofs.pending)
    market = Market(
        ctx, nodes=lambda: nodes.cache, verified=hwproofs.verified, held=trust.payability.held
    )
    inference = Inference(ctx, nodes=nodes, trust=trust, market=market, paid=trust.payability)
    jobs = Jobs(ctx, market=market)
    leases = Leases(ctx, nodes=lambda: nodes.cache, money=market)
    market.lease_of, market.end_lease = leases.ends_order, leases.end
    dashboard = Dashboard(
        ctx,
        power=nodes.power,
        orders=market.store.orders,
        audits=lambda: audit_summary(trust),
    )
    s = ctx.settings
    files = Files(ctx, open_store(s.files_url, s.files_options, s.data_dir))
    batches = Batches(ctx, files, BatchLines(inference, s.batch_price_bps))
    # One dispute shell; each domain brings its game (the rules and the consequences).
    disputes = DisputeShell([trust.disputes, jobs.disputes])
    ev = ctx.events
    # A registration: the market records the node's devices first (hardware proofs
    # challenge what it recorded), then trust and hardware proofs; the node is routable
    # once the cache is refreshed, and its long poll is woken last.
    ev.on(NodeRegistered, lambda e: ctx.db(market.on_register, e))
    ev.on(NodeRegistered, trust.on_register)
    ev.on(NodeRegistered, lambda e: ctx.db(hwproofs.on_register, e.node_id))
    ev.on(NodeRegistered, nodes.on_register)
    ev.on(NodeRegistered, lambda e: ctx.db(leases.on_register, e.node_id, e.body.get("swept", [])))
    ev.on(NodeRegistered, inference.on_register)
    ev.on(LiveNodesChanged, market.on_live_change)
    ev.on(SupplyChanged, lambda e: market.invalidate())
    # A slash or a top-up changes who may serve paid work (Market.inference_staked) at once.
    ctx.store.on_stakes_moved = market.invalidate
    ev.on(AnswerFinished, lambda e: ctx.db(market.on_answer, e))
    ev.on(AnswerFinished, trust.on_answer)

    async def db_tick(fn: Callable[..., object], *args: object) -> None:
        await ctx.db(fn, *args)

    supervisor = Supervisor(
        nodes.tick,
        [
            lambda live: db_tick(trust.payability.refresh, live),
            lambda live: db_tick(market.tick),
            leases.tick,  # after the market: it adopts the lease orders the market placed
            lambda live: db_tick(hwproofs.tick, live),
            lambda live: db_tick(jobs.tick, live),
            lambda live: db_tick(trust.expire, live),
            lambda live: db_tick(disputes.tick, live),
            # Ejection lives in the store; the cache every domain reads follows it.
            lambda live: db_tick(ctx.ejected.refresh),
            inference.tick,
            # After inference: on the first pass it has released the tasks of lines a
            # stopped coordinator left running, so the batch escrow covers their rerun.
            batches.tick,
        ],
        interval_s=min(0.5, ctx.settings.heartbeat_interval_s),
    )
    # A lease order is adopted on the next pass: run it now rather than up to 0.5 s later.
    market.lease_ordered = supervisor.wake
    return Services(
        ctx,
        nodes,
        inference,
        market,
        trust,
        hwproofs,
        jobs,
        dashboard,
        supervisor,
        disputes,
        files,
        leases,
        batches,
    )
