"""The web dashboard (/, /requests, /market, /ledger), its live stream, and the economics API.

Pages are server-rendered; the browser swaps in fragments that arrive over Server-Sent
Events whenever the grid changes. Access needs the operator key (every coordinator has
one), as a bearer token or as the cookie that /login sets; a local grid (`idlegrid up`)
also opens its read-only pages to a direct loopback caller (`from_loopback`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from idlegrid.coordinator.dashboard import queries
from idlegrid.coordinator.dashboard import schemas as s
from idlegrid.coordinator.dashboard.data import IDLE_REFRESH_S, PAGES, Dashboard, energy_by_node
from idlegrid.coordinator.deps import (
    from_loopback,
    require_operator,
    services,
)
from idlegrid.coordinator.schemas import errors, event_stream
from idlegrid.core import economics, energy, income, telemetry
from idlegrid.core.income import Income
from idlegrid.errors import AuthError, InvalidRequest

COOKIE = "idlegrid_operator"

router = APIRouter(tags=["dashboard"])


def _dashboard(request: Request) -> Dashboard:
    return services(request).dashboard


def _cookie_value(key: str) -> str:
    # A digest, not the key: a leaked cookie opens the dashboard, not the admin API.
    return hashlib.sha256(f"idlegrid-dashboard\n{key}".encode()).hexdigest()


def require_viewer(request: Request) -> None:
    """Dashboard access: the operator cookie, or whatever the operator routes accept."""
    settings = services(request).settings
    if settings.dashboard_open_on_loopback and from_loopback(request):
        return  # a local grid: its own machine reads the (read-only) pages without login
    key = settings.operator_key
    cookie = request.cookies.get(COOKIE, "")
    if key and cookie and hmac.compare_digest(cookie.encode(), _cookie_value(key).encode()):
        return
    require_operator(request)


def _login_page(request: Request, message: str, status: int) -> HTMLResponse:
    html = _dashboard(request).env.get_template("login.html").render(message=message)
    return HTMLResponse(html, status_code=status)


async def _page(request: Request, page: str) -> HTMLResponse:
    try:
        require_viewer(request)
    except AuthError as exc:
        return _login_page(request, exc.message, 401)
    html = await _dashboard(request).page(page)
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def grid_page(request: Request) -> HTMLResponse:
    """Providers, their hardware, speed, energy and earnings; live requests; charts."""
    return await _page(request, "grid")


@router.get("/requests", response_class=HTMLResponse, include_in_schema=False)
async def requests_page(request: Request) -> HTMLResponse:
    """Throughput, latency percentiles, queue, recent requests."""
    return await _page(request, "requests")


@router.get("/market", response_class=HTMLResponse, include_in_schema=False)
async def market_page(request: Request) -> HTMLResponse:
    """Offers, prices by model, price over time, orders."""
    return await _page(request, "market")


@router.get("/ledger", response_class=HTMLResponse, include_in_schema=False)
async def ledger_page(request: Request) -> HTMLResponse:
    """Balances by kind, fees, entries with their causes."""
    return await _page(request, "ledger")


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
async def login_form(request: Request) -> HTMLResponse:
    """The operator-key form."""
    return _login_page(request, "Enter this grid's operator key.", 200)


@router.post("/login", include_in_schema=False, response_model=None)
async def login(request: Request) -> Response:
    """Check the operator key from the form and keep it in an HttpOnly cookie."""
    form = parse_qs((await request.body()).decode(errors="replace"))
    given = (form.get("key") or [""])[0]
    key = services(request).settings.operator_key
    if not key:
        return RedirectResponse("/", status_code=303)
    if not hmac.compare_digest(given.encode(), key.encode()):
        return _login_page(request, "That is not this grid's operator key.", 401)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(COOKIE, _cookie_value(key), httponly=True, samesite="strict")
    return resp


@router.get("/dashboard/api/{page}", response_model=s.Snapshot, responses=errors(400, 401))
async def snapshot(page: str, request: Request) -> dict[str, Any]:
    """The fragments and chart data of one page, as the live stream sends them."""
    require_viewer(request)
    if page not in PAGES:
        raise InvalidRequest(f"no dashboard page {page!r}; pages: {', '.join(PAGES)}", param="page")
    dash, svc = _dashboard(request), services(request)
    return await dash.snapshot(page, svc.changes.version)


@router.get(
    "/dashboard/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: a snapshot whenever the grid changes",
            "content": event_stream(
                "JSON of a Snapshot holding only the changed sections (event `snapshot`)"
            ),
        },
        **errors(400, 401),
    },
)
async def events(request: Request, page: str = "grid", v: int | None = None) -> StreamingResponse:
    """Server-Sent Events: a `snapshot` of the page whenever the grid changes.

    `v` is the version the page was rendered at; fragments it already shows are not resent.
    """
    require_viewer(request)
    if page not in PAGES:
        raise InvalidRequest(f"no dashboard page {page!r}; pages: {', '.join(PAGES)}", param="page")
    dash, svc = _dashboard(request), services(request)

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        seen, sent = -1, None
        shown: dict[str, str] = {}
        # The build the page was rendered from (?v=): what the browser already shows.
        rendered = dash.cached(page, v) if v is not None else None
        if rendered is not None:
            seen, sent, shown = rendered["version"], rendered, dict(rendered["sections"])
        gone = asyncio.ensure_future(hung_up())
        try:
            while not gone.done():
                # Stop as soon as the browser leaves, not at the next write: a stream nobody
                # reads would otherwise keep rebuilding snapshots on every change.
                change = asyncio.ensure_future(svc.changes.wait(seen, IDLE_REFRESH_S))
                await asyncio.wait({change, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    change.cancel()
                    return
                snap = await dash.snapshot(page, change.result())
                seen = snap["version"]
                if snap is sent:  # the same build is not sent twice
                    continue
                sent = snap
                # Only the fragments that differ from what this browser already shows: a
                # thousand-row provider table that did not change is neither sent nor redrawn.
                fresh = {k: v for k, v in snap["sections"].items() if shown.get(k) != v}
                shown.update(fresh)
                body = json.dumps({**snap, "sections": fresh}, separators=(",", ":"))
                yield f"event: snapshot\ndata: {body}\n\n".encode()
        finally:
            gone.cancel()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ---- economics API (public, like /api/v1/status) -------------------------------------


def _since(period: str, now: float) -> float:
    return now - economics.parse_duration(period)


@router.get(
    "/api/v1/economics/earnings",
    tags=["economics"],
    response_model=s.Earnings,
    responses=errors(400),
)
async def earnings(
    request: Request, period: str = "24h", node: str | None = None
) -> dict[str, Any]:
    """Per provider over `period` (e.g. 24h, 7d): credits earned, accrued and paid, energy."""
    svc = services(request)
    now = svc.clock()
    since = _since(period, now)

    def gather() -> dict[str, Any]:
        store = svc.store
        nodes = store.nodes()
        balances = store.balances()
        worked = store.provider_income(since)
        used = energy_by_node(store, since)
        served: dict[str, dict[str, Any]] = {}
        for row in queries.attempt_energy(store, since):
            agg = served.setdefault(
                row["node_id"],
                {
                    "output_tokens": 0,
                    "energy_j": 0.0,
                    "requests": 0,
                    "estimated": False,
                    "models": {},
                },
            )
            agg["output_tokens"] += row["output_tokens"]
            agg["energy_j"] += row["energy_j"]
            agg["requests"] += row["requests"]
            agg["estimated"] = agg["estimated"] or row["estimated"]
            agg["models"][row["model"]] = energy.tokens_per_joule(
                row["output_tokens"], row["energy_j"]
            )
        return {
            "nodes": nodes,
            "balances": balances,
            "income": worked,
            "used": used,
            "served": served,
        }

    d = await to_thread.run_sync(gather)
    rows = []
    for n in d["nodes"]:
        if node and node not in (n.id, n.name):
            continue
        s = d["served"].get(
            n.id,
            {"output_tokens": 0, "energy_j": 0.0, "requests": 0, "estimated": False, "models": {}},
        )
        # No sample in the period yet: zero is a guess, not a reading.
        device_j, device_est = d["used"].get(n.id, (0.0, True))
        money = telemetry.provider_money(d["balances"], n.id)
        work = d["income"].get(n.id) or Income()
        power = svc.nodes.power.get(n.id)
        rows.append(
            {
                "node_id": n.id,
                "name": n.name,
                "hardware": n.hardware,
                "decode_tps": n.decode_tps,
                # Income for work only (core/income.py); a balance holds faucet credits
                # and moves with stake.
                "earned": work.earned,
                "income": {src: work.by_source.get(src, 0) for src in income.SOURCES},
                "accrued": money["accrued"],
                "paid": work.paid,
                # The device's energy over the period (idle included), from its heartbeats;
                # the part spent on requests, from their finish reports.
                "energy_j": device_j,
                "energy_estimated": device_est,
                "request_energy_j": s["energy_j"],
                "request_energy_estimated": s["estimated"],
                "output_tokens": s["output_tokens"],
                "requests": s["requests"],
                "tokens_per_joule": energy.tokens_per_joule(s["output_tokens"], s["energy_j"]),
                "tokens_per_joule_by_model": s["models"],
                "power": power,
            }
        )
    if node and not rows:
        raise InvalidRequest(f"no provider named or with id {node!r}", param="node")
    return {
        "period": period,
        "period_s": now - since,
        "since": since,
        "until": now,
        "fee_bps": svc.settings.fee_bps,
        "providers": rows,
    }


@router.get("/api/v1/economics/prices", tags=["economics"], response_model=s.Prices)
async def prices(request: Request) -> dict[str, Any]:
    """Live market prices per model (µcr per 1M tokens) and the providers' median speed."""
    svc = services(request)
    dash = _dashboard(request)
    nodes = await svc.db(svc.store.nodes)
    now = svc.clock()
    return {
        "fee_bps": svc.settings.fee_bps,
        "models": dash.market_prices(nodes, now - svc.settings.node_timeout_s),
    }
