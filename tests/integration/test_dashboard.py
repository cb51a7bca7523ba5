"""Dashboard, energy reports and the economics API against a real coordinator and agents."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from idlegrid import PROTOCOL_VERSION
from idlegrid.agent.hardware.power import RatedMeter
from idlegrid.agent.node_client import NodeClient
from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.dashboard.data import energy_by_node
from idlegrid.coordinator.db.store import Store, migrate
from idlegrid.core import energy
from idlegrid.core.energy import CounterSample
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.fake import FakeEngine
from idlegrid.errors import InvalidRequest
from idlegrid.protocol.signing import NodeKey
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
)

MODEL = "fake:1"


class Env:
    def __init__(self, coordinator: CoordinatorThread, agents: list[AgentThread], api_key: str):
        self.coordinator, self.agents, self.api_key = coordinator, agents, api_key

    @property
    def url(self) -> str:
        return self.coordinator.url

    @property
    def store(self) -> Store:
        store: Store = self.coordinator.app.state.services.store
        return store

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=30, **kw)

    def admin(self, **kw: Any) -> httpx.Client:
        """A client with the operator key: the pages, admin routes and every balance."""
        return self.coordinator.admin(timeout=30, **kw)

    def complete(self, prompt: str, max_tokens: int = 8) -> Any:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0)
        return client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0
        )


def start(
    tmp_path: Path,
    database_url: str,
    meters: list[RatedMeter | None],
    operator_key: str = "",
    open_on_loopback: bool = False,
) -> Env:
    settings = CoordinatorSettings(
        data_dir=tmp_path,
        database_url=database_url,
        port=free_port(),
        heartbeat_interval_s=0.2,
        node_timeout_s=3.0,
        power_sample_interval_s=0.2,
        operator_key=operator_key,
        dashboard_open_on_loopback=open_on_loopback,
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agents = []
    for i, meter in enumerate(meters):
        a = AgentThread(
            make_agent(
                coordinator.url,
                [FakeEngine(MODEL)],
                f"p{i}",
                price=Price(10 * MICRO, (40 + i) * MICRO),
                meter=meter,
            )
        )
        a.start()
        agents.append(a)
    with coordinator.admin() as c:
        deadline = threading.Event()
        for _ in range(600):
            nodes = c.get("/api/v1/status").json()["nodes"]
            if sum(n["live"] for n in nodes) >= len(meters):
                break
            deadline.wait(0.05)
        key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
        c.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 10 * MICRO, "reference": "t"},
        ).raise_for_status()
    return Env(coordinator, agents, key["api_key"])


def stop(env: Env) -> None:
    for a in env.agents:
        a.stop()
    env.coordinator.stop()


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[Env]:
    e = start(tmp_path, database_url, [RatedMeter(100.0), RatedMeter(300.0)])
    yield e
    stop(e)


def wait_until(predicate: Any, timeout_s: float = 15.0) -> None:
    tick = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        tick.wait(0.05)
    raise TimeoutError("condition not reached")


def test_energy_per_request_and_per_device_reach_the_economics_api(env: Env) -> None:
    answers = [env.complete(f"energy {i}") for i in range(4)]
    tokens = sum(a.usage.completion_tokens for a in answers)
    # Energy over a period is the difference of a device's counter: two samples per node.
    wait_until(
        lambda: (
            (samples := env.store.power_samples(0.0))
            and len(samples) == 2
            and all(len(rows) >= 2 for rows in samples.values())
        )
    )
    with env.http() as c:
        r = c.get("/api/v1/economics/earnings", params={"period": "1h"}).json()
    rows = r["providers"]
    assert sum(p["requests"] for p in rows) == 4
    assert sum(p["output_tokens"] for p in rows) == tokens
    for p in rows:
        assert p["energy_estimated"] is True  # a rated-power meter: never shown as measured
        assert p["energy_j"] > 0
        assert p["power"]["source"] == "estimate"
        if p["requests"]:
            assert p["request_energy_j"] > 0 and p["request_energy_estimated"] is True
            assert p["tokens_per_joule"] == pytest.approx(
                p["output_tokens"] / p["request_energy_j"]
            )
            assert p["earned"] == p["paid"] + p["accrued"] > 0
    assert r["period_s"] == pytest.approx(3600.0, abs=5)


def test_device_energy_in_sql_matches_the_core_arithmetic(env: Env) -> None:
    wait_until(
        lambda: (
            all(len(v) >= 5 for v in env.store.power_samples(0.0).values())
            and len(env.store.power_samples(0.0)) == 2
        )
    )
    samples = env.store.power_samples(0.0)
    by_sql = energy_by_node(env.store, 0.0)
    for node_id, rows in samples.items():
        counters = [CounterSample(t, j, est) for t, j, _, est in rows]
        core = energy.energy_between(counters, rows[0][0], rows[-1][0])
        sql_j, sql_est = by_sql[node_id]
        assert sql_j == pytest.approx(core.joules, rel=1e-9)
        assert sql_est is core.estimated is True


def test_dashboard_pages_list_providers_and_requests(env: Env) -> None:
    answer = env.complete("dashboard")
    with env.admin() as c:
        nodes = c.get("/api/v1/status").json()["nodes"]
        grid = c.get("/")
        ledger_html = c.get("/ledger").text
        market = c.get("/market").text
        snap = c.get("/dashboard/api/requests").json()
        static = c.get("/static/uPlot.iife.min.js")
    assert grid.status_code == 200 and grid.headers["content-type"].startswith("text/html")
    for n in nodes:
        assert f'data-node="{n["id"]}"' in grid.text
    assert f'data-request="{answer.id}"' in grid.text
    assert f'data-cause="{answer.id}"' in ledger_html
    assert "fake:1" in market and market.count("<tr>") >= 3
    assert f'data-request="{answer.id}"' in snap["sections"]["recent"]
    assert set(snap["charts"]) == {"chart-throughput", "chart-latency"}
    assert static.status_code == 200 and "uPlot" in static.text
    assert "cdn" not in grid.text.lower()


def test_live_stream_sends_a_snapshot_after_a_change(env: Env) -> None:
    with env.admin() as c, c.stream("GET", "/dashboard/events", params={"page": "ledger"}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = s.iter_lines()

        def next_snapshot() -> dict[str, Any]:
            for line in lines:
                if line.startswith("data: "):
                    snap: dict[str, Any] = json.loads(line[6:])
                    return snap
            raise AssertionError("stream ended")

        first = next_snapshot()
        assert "deposit-live" not in first["sections"]["entries"]
        with env.admin() as admin:
            admin.post(
                "/api/v1/admin/mint",
                json={"key_id": "key_x", "amount": 5, "reference": "deposit-live"},
            ).raise_for_status()
        for _ in range(5):
            if "deposit-live" in next_snapshot()["sections"]["entries"]:
                break
        else:
            raise AssertionError("the mint never reached the live stream")


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/dashboard/api/nope", "page"),
        ("/dashboard/events?page=nope", "page"),
        ("/api/v1/economics/earnings?period=-1h", "period"),
        ("/api/v1/economics/earnings?period=soon", "period"),
        ("/api/v1/economics/earnings?node=nobody", "node"),
    ],
)
def test_bad_dashboard_input_is_a_precise_400(env: Env, path: str, param: str) -> None:
    with env.admin() as c:
        r = c.get(path)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_a_bad_power_report_is_refused_and_an_old_agent_still_works(
    tmp_path: Path, database_url: str
) -> None:
    e = start(tmp_path, database_url, [None])  # an agent with no meter: sends no energy
    try:
        answer = e.complete("old agent")
        assert answer.usage.completion_tokens > 0

        async def bad_heartbeat() -> None:
            client = NodeClient(e.url, NodeKey.generate())
            try:
                await client.call(
                    "/api/v1/nodes/register",
                    {
                        "protocol_version": PROTOCOL_VERSION,
                        "name": "odd",
                        "hardware": {},
                        "engine": {},
                        "slots": 1,
                        "prefill_tps": 1,
                        "decode_tps": 1,
                        "offers": [{"model": MODEL, "prompt_price": 1, "output_price": 1}],
                    },
                )
                with pytest.raises(InvalidRequest) as info:
                    await client.call(
                        "/api/v1/nodes/heartbeat",
                        {"power": {"joules_total": -5, "source": "nvml", "estimated": False}},
                    )
                assert info.value.param == "power.joules_total"
            finally:
                await client.close()

        asyncio.run(bad_heartbeat())
        with e.http() as c:
            rows = c.get("/api/v1/economics/earnings").json()["providers"]
        served = [p for p in rows if p["name"] == "p0"][0]
        assert served["earned"] > 0
        assert served["requests"] == 0 and served["tokens_per_joule"] is None  # no energy
        assert e.store.power_samples(0.0) == {}
    finally:
        stop(e)


def test_with_an_operator_key_pages_need_the_key_or_its_cookie(
    tmp_path: Path, database_url: str
) -> None:
    e = start(tmp_path, database_url, [RatedMeter(50.0)], operator_key="sekret")
    try:
        with e.http(follow_redirects=False) as c:
            locked = c.get("/")
            assert locked.status_code == 401 and "<form" in locked.text
            assert c.get("/dashboard/events").status_code == 401
            assert c.get("/login").status_code == 200
            assert c.post("/login", content="key=wrong").status_code == 401
            ok = c.post("/login", content="key=sekret")
            assert ok.status_code == 303 and "httponly" in ok.headers["set-cookie"].lower()
            assert "sekret" not in ok.headers["set-cookie"]  # a digest, not the key
            assert c.get("/").status_code == 200  # the cookie is kept by the client
        with e.http(headers={"Authorization": "Bearer sekret"}) as c:
            assert c.get("/ledger").status_code == 200
    finally:
        stop(e)


def test_a_local_grid_opens_its_pages_to_this_machine_but_not_its_admin_routes(
    tmp_path: Path, database_url: str
) -> None:
    e = start(
        tmp_path, database_url, [RatedMeter(50.0)], operator_key="sekret", open_on_loopback=True
    )
    try:
        with e.http() as c:
            assert c.get("/").status_code == 200
            assert c.get("/ledger").status_code == 200
            assert c.post("/api/v1/admin/keys", json={"name": "x"}).status_code == 401
        with e.http(headers={"Authorization": "Bearer sekret"}) as c:
            assert c.post("/api/v1/admin/keys", json={"name": "x"}).status_code == 200
    finally:
        stop(e)


def test_without_a_configured_key_loopback_opens_nothing_but_the_data_dir_key_does(
    env: Env, tmp_path: Path
) -> None:
    key = (tmp_path / "operator-key").read_text().strip()  # created on first start
    assert key == env.coordinator.operator_key
    with env.http(follow_redirects=False) as c:
        assert c.get("/").status_code == 401
        assert c.get("/dashboard/api/grid").status_code == 401
        assert c.post("/api/v1/admin/keys", json={"name": "x"}).status_code == 401
        public = c.get("/api/v1/status").json()
        assert "balances" not in public and public["fees"] == 0
    with env.http(headers={"Authorization": f"Bearer {key}"}) as c:
        assert c.get("/").status_code == 200
        assert c.get("/dashboard/api/grid").status_code == 200
        assert c.post("/api/v1/admin/keys", json={"name": "x"}).status_code == 200
        assert "balances" in c.get("/api/v1/status").json()


def test_migrations_match_the_schema(tmp_path: Path, database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from idlegrid.coordinator.db.tables import Base

    migrate(database_url)
    store = Store(database_url, lambda: 0.0)
    try:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        store.close()
    assert diff == []


def test_earnings_and_estimate_cli_against_the_grid(env: Env, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from idlegrid.client.cli import app

    env.complete("earn something", max_tokens=10)
    runner = CliRunner()
    base = ["--coordinator", env.url, "--data-dir", str(tmp_path / "cli")]
    res = runner.invoke(
        app,
        [
            "earnings",
            *base,
            "--period",
            "1h",
            "--kwh-price",
            "0.5",
            "--card-price",
            "800",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "\x1b[" not in res.stdout  # no progress or colour codes in JSON
    data = json.loads(res.stdout)
    with env.admin() as c:
        balances = c.get("/api/v1/status").json()["balances"]
    rows = {p["node_id"]: p for p in data["providers"]}
    earner = [p for p in rows.values() if p["earned"] > 0][0]
    node = earner["node_id"]
    assert earner["paid"] + earner["accrued"] == (
        balances.get(f"provider:{node}", 0) + balances.get(f"accrual:{node}", 0)
    )
    e = earner["economics"]
    assert e["estimated"] is True
    assert e["profit_per_day"] == pytest.approx(e["earned_per_day"] - e["electricity_per_day"])
    assert e["electricity_per_day"] == pytest.approx(e["kwh_per_day"] * 0.5)
    assert e["payback_days"] is None or e["payback_days"] == pytest.approx(
        800 / e["profit_per_day"]
    )

    table = runner.invoke(app, ["earnings", *base, "--period", "1h"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "p0" in table.stdout and "profit/day" in table.stdout

    est = runner.invoke(
        app,
        [
            "estimate",
            *base,
            "--model",
            MODEL,
            "--decode-tps",
            "50",
            "--watts",
            "200",
            "--utilisation",
            "0.25",
            "--json",
        ],
    )
    assert est.exit_code == 0, est.output
    got = json.loads(est.stdout)
    median = got["market"]["output_median"]
    assert median == (40 * MICRO + 41 * MICRO) // 2  # the two live offers
    expected = 50 * 86_400 * 0.25 * median / 1e12 * (1 - got["fee_bps"] / 10_000)
    assert got["earned_credits_per_day"] == pytest.approx(expected, rel=1e-6)
    assert got["kwh_per_day"] == pytest.approx((200 * 0.25 + 40 * 0.75) * 24 / 1000)
    assert got["estimated"] is True

    bad = runner.invoke(app, ["earnings", *base, "--kwh-price", "-1"])
    assert bad.exit_code == 2
    unknown = runner.invoke(app, ["estimate", *base, "--model", "nope:1", "--decode-tps", "5"])
    assert unknown.exit_code == 2 and "no live provider offers nope:1" in unknown.output


def test_live_stream_resends_only_fragments_that_changed(env: Env) -> None:
    import re

    with env.admin() as c:
        html = c.get("/requests").text
        version = re.search(r'data-version="(\d+)"', html)
        assert version is not None
        with c.stream(
            "GET", "/dashboard/events", params={"page": "requests", "v": version.group(1)}
        ) as s:
            lines = s.iter_lines()
            with env.admin() as admin:  # a change that nothing on the requests page shows
                admin.post(
                    "/api/v1/admin/mint",
                    json={"key_id": "key_y", "amount": 5, "reference": "quiet"},
                ).raise_for_status()
            snap = next(json.loads(line[6:]) for line in lines if line.startswith("data: "))
    assert snap["version"] > int(version.group(1))
    assert snap["sections"] == {}  # the browser already shows all of it
    assert set(snap["charts"]) == {"chart-throughput", "chart-latency"}
