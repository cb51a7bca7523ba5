"""What the dashboard and the economics API show, gathered from the store and the grid.

Every function here is blocking (store calls, template rendering) and is run in a worker
thread by the routes, so a page with a thousand providers never stalls the event loop that
serves completions.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyio import to_thread
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import text

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.dashboard import queries
from idlegrid.core import energy, income, telemetry
from idlegrid.core.ledger import FEES, MICRO
from idlegrid.errors import InvalidRequest

if TYPE_CHECKING:  # the market's read model, injected by the composition root
    from idlegrid.coordinator.market.views import OrderView

WEB = Path(__file__).parent / "web"
PAGES: dict[str, tuple[str, ...]] = {
    "grid": ("summary", "providers", "recent"),
    "requests": ("reqstats", "recent"),
    "market": ("prices", "offers", "orders"),
    "ledger": ("money", "entries"),
}
CHART_WINDOW_S = 15 * 60.0
CHART_BUCKET_S = 15.0
ENERGY_WINDOW_S = 3600.0
TOP_DEVICES = 8
MIN_REBUILD_S = 0.25
TABLE_REFRESH_S = 3.0
# A browser lays a table out only once it has all of it: a thousand rows would hold the
# first paint back by most of a second, and nobody reads past the first screens anyway.
TABLE_ROWS = 200
# Without changes, rebuild now and then anyway so the charts' time axis moves.
IDLE_REFRESH_S = 5.0


def _credits(ucr: int | float) -> str:
    return f"{ucr / MICRO:,.6f}".rstrip("0").rstrip(".") if ucr else "0"


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _energy(kwh: float | None) -> str:
    if kwh is None:
        return "—"
    return f"{kwh:.3f} kWh" if kwh >= 0.1 else f"{kwh * 1000:.2f} Wh"


def _hardware(hw: dict[str, Any]) -> str:
    gpus = hw.get("gpus") or []
    if gpus:
        return ", ".join(str(g.get("name", "GPU")) for g in gpus)
    cores = hw.get("cpu_logical") or hw.get("cpu_cores")
    return f"{hw.get('cpu_model') or 'CPU'}" + (f", {cores} cores" if cores else "")


def make_env() -> Environment:
    """The Jinja environment for the dashboard's templates."""
    env = Environment(
        loader=FileSystemLoader(WEB / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["credits"] = _credits
    env.filters["ago"] = _ago
    env.filters["energy"] = _energy
    return env


def energy_by_node(store: Any, since: float) -> dict[str, tuple[float, bool]]:
    """Joules each node used since `since` (from its heartbeat counter), and if estimated.

    Sums the rises between consecutive samples; a counter that went down was reset (the
    agent restarted) and counts from zero, as core.energy.energy_between does.
    """
    query = text("""
        SELECT node_id,
               SUM(CASE WHEN d IS NULL THEN 0 WHEN d >= 0 THEN d ELSE joules_total END),
               MAX(CASE WHEN estimated THEN 1 ELSE 0 END)
        FROM (SELECT node_id, joules_total, estimated,
                     joules_total - LAG(joules_total) OVER (PARTITION BY node_id ORDER BY t) AS d
              FROM power_samples WHERE t >= :since) AS s
        GROUP BY node_id""")
    with store.read() as s:
        rows = s.execute(query, {"since": since}).all()
    return {n: (float(j or 0.0), bool(e)) for n, j, e in rows}


@dataclass(frozen=True)
class _Built:
    version: int  # the change version the build started at: it reflects at least that
    built_at: float
    interval_s: float  # no rebuild before built_at + interval_s
    snap: dict[str, Any]


@dataclass
class PageInputs:
    """Everything one refresh reads, fetched once and shared by the sections."""

    now: float
    nodes: list[Any]
    balances: dict[str, int]
    tasks: dict[str, int]
    finished: list[dict[str, Any]]
    power: dict[str, dict[str, Any]]
    live_cutoff: float
    audits: dict[str, dict[str, Any]] = field(default_factory=dict)  # trust's, per node


def audits_text(a: dict[str, Any] | None) -> str:
    """A provider's audit record in words, saying why audits wait when no verifier can
    check it (never a bare dash while audits are pending)."""
    if a is None:
        return "—"
    parts = ["ejected"] if a["ejected"] else []
    parts += [f"{a[k]} {k}" for k in ("passed", "failed") if a[k]]
    nobody = f"no verifier for {a['engine']}"
    if a["open"]:
        parts.append(f"{a['open']} pending" + ("" if a["verifiable"] else f": {nobody}"))
    elif not a["verifiable"]:
        parts.append(f"unaudited: {nobody}")
    return " · ".join(parts) or "none yet"


def reputation_text(a: dict[str, Any] | None) -> str:
    """The chance its audit record gives that the provider is honest (trust's posterior)."""
    return "—" if a is None else f"{1 - a['spoofer_probability']:.0%} honest"


class Dashboard:
    """Builds the dashboard's pages, live fragments and chart data."""

    def __init__(
        self,
        ctx: Context,
        power: dict[str, dict[str, Any]],
        orders: Callable[[], list[OrderView]],
        audits: Callable[[], dict[str, dict[str, Any]]] = dict,
    ) -> None:
        self.ctx = ctx
        self.audits_now = audits  # trust's audit record per provider (trust/payability.py)
        self.power = power  # the latest power report per node, kept by the nodes domain
        self.orders_now = orders  # the market's orders, newest first
        self.env = make_env()
        self._cache: dict[str, _Built] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # (built at, rows, rendered html) of the provider table: with a thousand providers
        # it is most of a build, so it is redone every TABLE_REFRESH_S, not on every change;
        # the live requests and the summary still follow each change.
        self._table: tuple[float, list[dict[str, Any]], str | None] = (-1e9, [], None)

    def _table_stale(self) -> bool:
        return time.monotonic() - self._table[0] >= TABLE_REFRESH_S

    # ---- data --------------------------------------------------------------------------

    def _context(self, page: str, need_nodes: bool) -> PageInputs:
        store, now = self.ctx.store, self.ctx.clock()
        return PageInputs(
            now=now,
            nodes=store.nodes() if need_nodes else [],
            balances=store.balances(),
            tasks=store.task_counts(),
            finished=queries.finished_tasks(store, now - CHART_WINDOW_S),
            power=dict(self.power),
            live_cutoff=now - self.ctx.settings.node_timeout_s,
            audits=self.audits_now() if need_nodes and page == "grid" else {},  # its table
        )

    def providers(self, ctx: PageInputs) -> list[dict[str, Any]]:
        """One row per registered provider, live ones first."""
        store = self.ctx.store
        per_model: dict[str, list[dict[str, Any]]] = {}
        for row in queries.attempt_energy(store, 0.0):
            per_model.setdefault(row["node_id"], []).append(row)
        used = energy_by_node(store, ctx.now - ENERGY_WINDOW_S)
        worked = income.totals(ctx.balances, store.deposits())
        rows = []
        for n in ctx.nodes:
            live = n.present_since(ctx.live_cutoff)
            models = per_model.get(n.id, [])
            tokens = sum(m["output_tokens"] for m in models)
            joules = sum(m["energy_j"] for m in models)
            power = ctx.power.get(n.id)
            kwh_j, kwh_est = used.get(n.id, (None, False))
            money = telemetry.provider_money(ctx.balances, n.id)
            rows.append(
                {
                    "id": n.id,
                    "name": n.name,
                    "state": n.state if n.state != "live" else ("live" if live else "gone"),
                    "live": live,
                    "last_seen_ago": ctx.now - n.last_seen,
                    "hardware": _hardware(n.hardware),
                    "region": n.hardware.get("region") or "",
                    "engine": n.engine.get("engine", ""),
                    "models": ", ".join(sorted(n.offers)),
                    "decode_tps": n.decode_tps,
                    "prefill_tps": n.prefill_tps,
                    "tokens_per_joule": energy.tokens_per_joule(tokens, joules),
                    "tpj_estimated": any(m["estimated"] for m in models),
                    "tpj_by_model": {
                        m["model"]: energy.tokens_per_joule(m["output_tokens"], m["energy_j"])
                        for m in models
                    },
                    "watts": power.get("watts") if power else None,
                    "power_source": power.get("source") if power else None,
                    "power_estimated": bool(power and power.get("estimated")),
                    "kwh": energy.kwh(kwh_j) if kwh_j is not None else None,
                    "kwh_estimated": kwh_est,
                    "accrued": money["accrued"],
                    # Paid for work, never the balance: that holds faucet credits and stake.
                    "paid": worked[n.id].paid if n.id in worked else 0,
                    "reputation": reputation_text(ctx.audits.get(n.id)),
                    "audits": audits_text(ctx.audits.get(n.id)),
                }
            )
        rows.sort(key=lambda r: (not r["live"], r["name"]))
        return rows

    def request_stats(self, ctx: PageInputs) -> dict[str, Any]:
        """Throughput, latency percentiles and queue depth."""
        done = [t for t in ctx.finished if t["state"] == "done"]
        minute = [t for t in done if t["ended_at"] >= ctx.now - 60]
        recent = [t["latency_s"] for t in done if t["ended_at"] >= ctx.now - 300]
        return {
            "queued": ctx.tasks.get("queued", 0),
            "running": ctx.tasks.get("running", 0),
            "done": ctx.tasks.get("done", 0),
            "failed": ctx.tasks.get("failed", 0),
            "tokens_per_s": sum(t["output_tokens"] for t in minute) / 60.0,
            "requests_per_min": len(minute),
            "p50": telemetry.percentile(recent, 50),
            "p95": telemetry.percentile(recent, 95),
            "p99": telemetry.percentile(recent, 99),
            "latency_n": len(recent),
        }

    def throughput_chart(self, ctx: PageInputs) -> dict[str, Any]:
        """Output tokens per second over the chart window."""
        start = ctx.now - CHART_WINDOW_S
        xs, tok = telemetry.buckets(
            (
                (t["ended_at"], float(t["output_tokens"]))
                for t in ctx.finished
                if t["state"] == "done"
            ),
            start,
            ctx.now,
            CHART_BUCKET_S,
        )
        _, reqs = telemetry.buckets(
            ((t["ended_at"], 1.0) for t in ctx.finished), start, ctx.now, CHART_BUCKET_S
        )
        return {
            "title": "Throughput",
            "x": xs,
            "series": [
                {"label": "output tok/s", "values": [v / CHART_BUCKET_S for v in tok]},
                {"label": "requests/s", "values": [v / CHART_BUCKET_S for v in reqs]},
            ],
        }

    def latency_chart(self, ctx: PageInputs) -> dict[str, Any]:
        """Mean request latency per bucket."""
        start = ctx.now - CHART_WINDOW_S
        xs, mean = telemetry.bucket_mean(
            ((t["ended_at"], t["latency_s"]) for t in ctx.finished if t["state"] == "done"),
            start,
            ctx.now,
            CHART_BUCKET_S,
        )
        return {"title": "Latency (s)", "x": xs, "series": [{"label": "mean s", "values": mean}]}

    def energy_chart(self, ctx: PageInputs, providers: list[dict[str, Any]]) -> dict[str, Any]:
        """Power draw of the devices that used the most energy in the last hour."""
        top = sorted((p for p in providers if p["kwh"]), key=lambda p: -p["kwh"])[:TOP_DEVICES]
        start = ctx.now - CHART_WINDOW_S
        samples = self.ctx.store.power_samples(start) if top else {}
        series = []
        xs: list[float] = telemetry.buckets([], start, ctx.now, CHART_BUCKET_S)[0]
        for p in top:
            pts = [(t, w) for t, _, w, _ in samples.get(p["id"], []) if w is not None]
            xs, mean = telemetry.bucket_mean(pts, start, ctx.now, CHART_BUCKET_S)
            label = p["name"] + (" (est.)" if p["kwh_estimated"] else "")
            series.append({"label": label, "values": mean})
        return {"title": "Power per device (W)", "x": xs, "series": series}

    def price_chart(self, ctx: PageInputs) -> dict[str, Any]:
        """Mean output price paid per model over the chart window (credits per 1M tokens)."""
        start = ctx.now - CHART_WINDOW_S
        rows = queries.attempt_prices(self.ctx.store, start)
        models = sorted({m for _, m, _, _ in rows})[:5]
        series = []
        xs = telemetry.buckets([], start, ctx.now, CHART_BUCKET_S)[0]
        for model in models:
            xs, mean = telemetry.bucket_mean(
                ((t, o / MICRO) for t, m, _, o in rows if m == model),
                start,
                ctx.now,
                CHART_BUCKET_S,
            )
            series.append({"label": f"{model} output", "values": mean})
        return {"title": "Price paid (credits / 1M output tokens)", "x": xs, "series": series}

    def market_prices(self, nodes: list[Any], live_cutoff: float) -> list[dict[str, Any]]:
        """Per model: live providers' price range, median, and median measured speed."""
        by_model: dict[str, list[Any]] = {}
        for n in nodes:
            if n.live_since(live_cutoff):
                for model in n.offers:
                    by_model.setdefault(model, []).append(n)
        out = []
        for model, ns in sorted(by_model.items()):
            outs = [n.offers[model].output for n in ns]
            ins = [n.offers[model].prompt for n in ns]
            out.append(
                {
                    "model": model,
                    "providers": len(ns),
                    "output_min": min(outs),
                    "output_median": int(statistics.median(outs)),
                    "output_max": max(outs),
                    "prompt_median": int(statistics.median(ins)),
                    "decode_tps_median": statistics.median(n.decode_tps for n in ns),
                }
            )
        return out

    def money(self, ctx: PageInputs) -> dict[str, Any]:
        """Balances by account kind, fees, and the largest accounts."""
        kinds = telemetry.totals_by_kind(ctx.balances)
        top = sorted(
            ((a, b) for a, b in ctx.balances.items() if a != "system:issuer"),
            key=lambda ab: -abs(ab[1]),
        )[:20]
        return {
            "kinds": kinds,
            "fees": ctx.balances.get(FEES, 0),
            "fees_hour": queries.fee_income(self.ctx.store, ctx.now - 3600),
            "circulating": -ctx.balances.get("system:issuer", 0),
            "top": top,
            "fee_bps": self.ctx.settings.fee_bps,
        }

    def orders(self) -> list[dict[str, Any]] | None:
        """The newest market orders: what was bought, where it runs, what it cost."""
        views = self.orders_now()[:TABLE_ROWS]
        return [
            {
                "order": v.id,
                "kind": v.kind,
                "state": v.state,
                "where": ", ".join(leg["offer_id"] for leg in (v.placement or {}).get("legs", []))
                or (v.reasons or {}).get("decisive", "—"),
                "budget (cr)": _credits(v.budget),
                "spent (cr)": _credits(v.spent),
                "refunded (cr)": _credits(v.refunded),
            }
            for v in views
        ]

    # ---- rendering ---------------------------------------------------------------------

    def build(self, page: str) -> dict[str, Any]:
        """Fragments and charts for one page, as the live stream sends them."""
        if page not in PAGES:
            raise InvalidRequest(
                f"no dashboard page {page!r}; pages: {', '.join(PAGES)}", param="page"
            )
        # The grid page's provider table has its own, slower cadence (see __init__).
        rebuild_table = page == "grid" and self._table_stale()
        ctx = self._context(page, need_nodes=page == "market" or rebuild_table)
        data: dict[str, Any] = {"now": ctx.now, "page": page, "table_rows": TABLE_ROWS}
        charts: dict[str, Any] = {}
        table_html = None
        if page == "grid":
            if rebuild_table:
                providers = self.providers(ctx)
                self._table = (time.monotonic(), providers, None)
            else:
                providers, table_html = self._table[1], self._table[2]
            live = [p for p in providers if p["live"]]
            data.update(
                providers=providers,
                stats=self.request_stats(ctx),
                summary={
                    "providers": len(providers),
                    "live": len(live),
                    "watts": sum(p["watts"] or 0 for p in live),
                    "watts_estimated": any(p["power_estimated"] for p in live),
                    "kwh": sum(p["kwh"] or 0 for p in providers),
                    "kwh_estimated": any(p["kwh_estimated"] for p in providers),
                    "fees": ctx.balances.get(FEES, 0),
                },
            )
            charts = {
                "chart-throughput": self.throughput_chart(ctx),
                "chart-energy": self.energy_chart(ctx, providers),
            }
        elif page == "requests":
            data["stats"] = self.request_stats(ctx)
            charts = {
                "chart-throughput": self.throughput_chart(ctx),
                "chart-latency": self.latency_chart(ctx),
            }
        elif page == "market":
            data.update(
                prices=self.market_prices(ctx.nodes, ctx.live_cutoff),
                offers=[
                    (n, m, p)
                    for n in ctx.nodes
                    for m, p in sorted(n.offers.items())
                    if n.live_since(ctx.live_cutoff)
                ],
                orders=self.orders(),
            )
            charts = {"chart-price": self.price_chart(ctx)}
        else:
            data.update(money=self.money(ctx), entries=queries.recent_entries(self.ctx.store, 50))
        data["recent"] = ctx.finished[:25]
        sections = {
            name: self.env.get_template(f"partials/{name}.html").render(**data)
            for name in PAGES[page]
            if not (name == "providers" and table_html)
        }
        if page == "grid":
            if table_html is None:
                self._table = (self._table[0], self._table[1], sections["providers"])
            else:
                sections["providers"] = table_html
        return {"page": page, "now": ctx.now, "sections": sections, "charts": charts}

    async def snapshot(
        self, page: str, version: int, max_age_s: float = IDLE_REFRESH_S
    ) -> dict[str, Any]:
        """A snapshot that reflects at least change `version`, shared by every watcher.

        One build at a time per page, and builds at least twice their own duration apart:
        a grid that changes a hundred times a second costs one rebuild per interval, however
        many browsers watch it, and never more than about half of one core.
        """
        lock = self._locks.setdefault(page, asyncio.Lock())
        async with lock:
            hit = self._cache.get(page)
            now = time.monotonic()
            if hit and hit.version >= version and now - hit.built_at < max_age_s:
                return hit.snap
            if hit:
                await asyncio.sleep(max(0.0, hit.built_at + hit.interval_s - now))
            current = self.ctx.changes.version
            started = time.monotonic()
            snap = await to_thread.run_sync(self.build, page)
            took = time.monotonic() - started
            snap["version"] = current
            self._cache[page] = _Built(
                current, time.monotonic(), max(MIN_REBUILD_S, 2 * took), snap
            )
            return snap

    async def page(self, page: str) -> str:
        """A whole page: the same fragments, inside the layout, with the chart data inline."""
        snap = await self.snapshot(page, self.ctx.changes.version)
        return self.env.get_template(f"{page}.html").render(
            page=page,
            sections=snap["sections"],
            charts=snap["charts"],
            now=snap["now"],
            version=snap["version"],
        )

    def cached(self, page: str, version: int) -> dict[str, Any] | None:
        """The shared build of `page` at `version`, if it is still the newest one."""
        hit = self._cache.get(page)
        return hit.snap if hit and hit.version == version else None
