"""Hostile input on a real loopback grid: poison strings, oversized bodies, silent channels."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import websockets
from test_grid import MODEL, Grid, start_grid, stop_grid

from idlegrid import PROTOCOL_VERSION
from idlegrid.agent import channel as agent_channel
from idlegrid.agent.channel import Channel
from idlegrid.agent.node_client import NodeClient
from idlegrid.core import ledger
from idlegrid.engines.fake import FakeEngine
from idlegrid.protocol.signing import NodeKey
from idlegrid.testbed.commits import commitment_b64
from idlegrid.testbed.inprocess import free_port


@pytest.fixture
def grid(tmp_path: Path, database_url: str) -> Iterator[Grid]:
    g = start_grid(
        tmp_path, database_url, [FakeEngine(MODEL), FakeEngine(MODEL)], max_body_bytes=64 << 10
    )
    yield g
    g.verify()
    stop_grid(g)


def _post(grid: Grid, path: str, raw: str) -> tuple[int, dict]:
    with grid.http() as c:
        r = c.post(
            path,
            content=raw.encode(),
            headers={"Authorization": f"Bearer {grid.api_key}", "Content-Type": "application/json"},
        )
        return r.status_code, r.json()


@pytest.mark.parametrize(
    "path,body,param",
    [
        (
            "/v1/completions",
            '{"model":"fake:1","prompt":"hi","max_tokens":4,"stop":["\\ud800"]}',
            "stop.0",
        ),
        ("/v1/completions", '{"model":"fake:1","prompt":"a\\udc00b","max_tokens":4}', "prompt"),
        (
            "/v1/chat/completions",
            '{"model":"fake:1","messages":[{"role":"user","content":"x\\ud83d"}],"max_tokens":4}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"model":"fake:1","messages":[{"role":"user","content":'
            '[{"type":"text","text":"\\udfff"}]}]}',
            "messages.0.content.0.text",
        ),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field_and_post_nothing(
    grid: Grid, path: str, body: str, param: str
) -> None:
    before = len(grid.entries())
    status, answer = _post(grid, path, body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["code"] == "invalid_text"
    assert len(grid.entries()) == before


def test_after_the_poison_stop_three_requests_are_served(grid: Grid) -> None:
    status, _ = _post(
        grid,
        "/v1/completions",
        '{"model":"fake:1","prompt":"hi","max_tokens":4,"stop":["\\ud800"]}',
    )
    assert status == 400
    client = grid.client(timeout=60)
    for i in range(3):
        out = client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=6)
        assert out.usage.completion_tokens == 6
    # A surrogate pair (an emoji) is text, and is served.
    status, answer = _post(
        grid, "/v1/completions", '{"model":"fake:1","prompt":"\\ud83d\\ude00","max_tokens":2}'
    )
    assert status == 200, answer


def test_a_body_over_the_limit_is_413_before_it_is_read(grid: Grid) -> None:
    big = json.dumps({"model": MODEL, "prompt": "x" * (70 << 10), "max_tokens": 1})
    status, answer = _post(grid, "/v1/completions", big)
    assert status == 413 and answer["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model":"fake:1","prompt":"'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'

    with grid.http() as c:
        r = c.post(
            "/v1/completions",
            content=chunks(),
            headers={"Authorization": f"Bearer {grid.api_key}", "Content-Type": "application/json"},
        )
    assert r.status_code == 413


def test_a_poll_the_coordinator_never_answers_is_given_up(monkeypatch) -> None:
    monkeypatch.setattr(agent_channel, "POLL_GRACE_S", 0.5)

    async def main() -> None:
        async def silent(ws: websockets.ServerConnection) -> None:
            async for _ in ws:  # reads every frame, answers none
                pass

        port = free_port()
        async with websockets.serve(silent, "127.0.0.1", port):
            client = NodeClient(f"http://127.0.0.1:{port}", NodeKey.generate())
            ch = Channel(client)
            await ch.connect(f"ws://127.0.0.1:{port}{agent_channel.CHANNEL_PATH}")
            try:
                got = await asyncio.wait_for(ch.poll(0, [MODEL], 0.2), 5.0)
                assert got is None and ch.polls_unanswered == 1 and ch.open
            finally:
                await ch.close()
                await client.close()

    asyncio.run(main())


def test_a_greedy_unstaked_node_changes_nothing_for_a_consumer(
    tmp_path: Path, database_url: str
) -> None:
    from idlegrid.core.ledger import MICRO, Price
    from idlegrid.protocol.messages import MAX_TOKEN_PRICE
    from idlegrid.testbed.inprocess import AgentThread, make_agent, wait_for_live

    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL)], credits=1)
    greedy = AgentThread(
        make_agent(
            g.url, [FakeEngine(MODEL)], "greedy", price=Price(MAX_TOKEN_PRICE, MAX_TOKEN_PRICE)
        )
    )
    greedy.start()
    g.agents.append(greedy)
    try:
        wait_for_live(g.url, 2)
        client = g.client(timeout=60)
        for i in range(3):  # 1 credit covers these at 10/40 per 1M, never at 100,000
            out = client.completions.create(model=MODEL, prompt=f"hello {i}", max_tokens=8)
            assert out.usage.completion_tokens == 8
        greedy_id = next(n["id"] for n in g.nodes() if n["name"] == "greedy")
        holds = [
            p
            for e in g.entries()
            if str(e["key"]).startswith("hold:")
            for p in e["postings"]
            if p["amount"] > 0
        ]  # type: ignore[union-attr]
        assert holds and max(p["amount"] for p in holds) < 1 * MICRO
        paid = {p["account"] for e in g.entries() for p in e["postings"]}  # type: ignore[union-attr]
        assert ledger.provider_account(greedy_id) not in paid
        # A cap below every offer is the consumer's own limit: a 400 naming it, with the
        # lowest offers to raise it to (not a 503 that clients retry for nothing).
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model=MODEL,
                prompt="x",
                max_tokens=2,
                extra_body={"max_price": {"prompt": 1, "output": 1}},
            )
        body = err.value.body
        assert isinstance(body, dict) and body["param"] == "max_price", body
        assert body["code"] == "max_price_below_offers"
        assert body["data"]["lowest_offers"] == {"prompt": 10.0, "output": 40.0}, body
    finally:
        g.verify()
        stop_grid(g)


def test_prices_past_the_bound_are_refused_at_registration(grid: Grid) -> None:
    import time

    from test_grid import _signed_post

    key = NodeKey.generate()
    body = {
        "protocol_version": PROTOCOL_VERSION,
        "name": "overflow",
        "hardware": {},
        "engine": {},
        "slots": 1,
        "prefill_tps": 1,
        "decode_tps": 1,
        "offers": [{"model": MODEL, "prompt_price": 2**64, "output_price": 1}],
    }
    r = _signed_post(grid.url, key, "/api/v1/nodes/register", body, now=time.time())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "offers.0.prompt_price"
    body["offers"][0]["prompt_price"] = 1  # type: ignore[index]
    body["hardware"] = {"blob": "x" * (20 << 10)}
    r = _signed_post(grid.url, key, "/api/v1/nodes/register", body, now=time.time())
    assert r.status_code == 400 and r.json()["error"]["param"] == "hardware"


async def _hand_provider_takes_a_task(c: NodeClient, name: str, consumer) -> tuple:
    """Register a hand-driven provider (the real, signed node API), start the consumer's
    request in a thread, and claim it: (the consumer's thread, the task or None)."""
    import threading

    from idlegrid.core.ledger import MICRO

    await c.call(
        "/api/v1/nodes/register",
        {
            "protocol_version": PROTOCOL_VERSION,
            "name": name,
            "hardware": {},
            "engine": {"engine": "fake"},
            "slots": 1,
            "prefill_tps": 1,
            "decode_tps": 1,
            "offers": [{"model": MODEL, "prompt_price": 10 * MICRO, "output_price": 40 * MICRO}],
        },
    )
    t = threading.Thread(target=consumer)
    t.start()
    return t, await c.call("/api/v1/work/poll", {"models": [MODEL], "wait_s": 20})


def test_a_provider_cannot_upload_past_max_tokens_or_smuggle_text(
    tmp_path: Path, database_url: str
) -> None:
    """A hand-driven provider (the real node API, signed) tries to deliver 8,000 tokens for
    max_tokens 4, then unbilled text in id -1 pieces; the coordinator keeps the budget."""

    import openai

    from idlegrid.errors import Conflict

    g = start_grid(tmp_path, database_url, [], credits=10)
    result: dict = {}

    def consumer() -> None:
        try:
            result["out"] = g.client(timeout=60).completions.create(
                model=MODEL, prompt="hi", max_tokens=4
            )
        except openai.APIError as exc:
            result["error"] = exc

    async def provider() -> None:
        c = NodeClient(g.url, NodeKey.generate())
        try:
            t, task = await _hand_provider_takes_a_task(c, "cheat", consumer)
            assert task is not None, result
            base = f"/api/v1/tasks/{task['task_id']}/attempts/{task['attempt']}"
            with pytest.raises(Conflict):
                await c.call(f"{base}/upload", {"start": 0, "pieces": [[5, "x"]] * 4000})
            with pytest.raises(Conflict):  # two flushes, text without tokens
                await c.call(f"{base}/upload", {"start": 0, "pieces": [[-1, "y" * 100]] * 2})
            await c.call(f"{base}/upload", {"start": 0, "pieces": [[5, "a"]] * 4})
            with pytest.raises(Conflict):  # the budget is spent
                await c.call(f"{base}/upload", {"start": 4, "pieces": [[5, "b"]]})
            blob = commitment_b64([5] * 4, 2, task["seed"])  # 2 prompt tokens, 4 delivered
            await c.call(
                f"{base}/finish",
                {"prompt_tokens": 2, "finish_reason": "length", "commitment": blob},
            )
            await asyncio.to_thread(t.join, 60)
        finally:
            await c.close()

    try:
        asyncio.run(provider())
        assert "error" not in result, result.get("error")
        assert result["out"].choices[0].text == "aaaa"
        assert result["out"].usage.completion_tokens == 4
        # Paid for the 4 tokens it was allowed and the 2 prompt tokens, nothing more.
        paid = sum(
            p["amount"]
            for e in g.entries()
            for p in e["postings"]
            if str(p["account"]).startswith("accrual:") or p["account"] == ledger.FEES
        )
        assert paid == 4 * 40 + 2 * 10
    finally:
        g.verify()
        stop_grid(g)


def test_idle_and_slow_header_connections_are_cut(tmp_path: Path, database_url: str) -> None:
    import socket
    import time

    g = start_grid(tmp_path, database_url, [], credits=0, header_timeout_s=1.0)
    try:
        host, port = "127.0.0.1", int(g.url.rsplit(":", 1)[1])
        idle = [socket.create_connection((host, port)) for _ in range(20)]
        slow = socket.create_connection((host, port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        began = time.monotonic()
        for s in [*idle, slow]:
            s.settimeout(10)
            assert s.recv(1) == b""  # closed by the server, not by our timeout
            s.close()
        assert time.monotonic() - began < 5
        with g.http() as c:  # the server itself is fine
            assert c.get("/healthz").status_code == 200
    finally:
        stop_grid(g)


def _forwarder(target: tuple[str, int]) -> tuple[int, object]:
    """A same-host TCP forwarder (as socat would be): every caller looks like loopback."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            b.close()

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(target)
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], server


def test_operator_routes_need_the_key_through_a_forwarder_a_proxy_or_a_foreign_host(
    grid: Grid,
) -> None:
    import httpx as hx

    port = int(grid.url.rsplit(":", 1)[1])
    fwd_port, server = _forwarder(("127.0.0.1", port))
    mint = {"key_id": grid.key_id, "amount": 10**15, "reference": "stolen"}
    try:
        with hx.Client(base_url=f"http://127.0.0.1:{fwd_port}", trust_env=False) as c:
            # No key configured at start: one was generated; loopback alone opens nothing.
            assert c.post("/api/v1/admin/mint", json=mint).status_code == 401
            assert c.get("/api/v1/ledger").status_code == 401
            assert "balances" not in c.get("/api/v1/status").json()
            r = c.post("/api/v1/admin/mint", json=mint, headers={"X-Forwarded-For": "203.0.113.9"})
            assert r.status_code == 401
            # DNS rebinding: a browser page on attacker.example that resolves to 127.0.0.1.
            r = c.get("/api/v1/status", headers={"Host": "attacker.example"})
            assert r.status_code == 400
            r = c.get("/dashboard/api/providers", headers={"Host": "attacker.example"})
            assert r.status_code == 400
    finally:
        server.close()  # type: ignore[attr-defined]
    key_file = Path(grid.coordinator.settings.data_dir) / "operator-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    with hx.Client(
        base_url=grid.url,
        trust_env=False,
        headers={"Authorization": f"Bearer {key_file.read_text().strip()}"},
    ) as c:
        assert "balances" in c.get("/api/v1/status").json()


def test_a_public_bind_without_tls_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "idlegrid",
            "coordinator",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2
    assert "--tls-cert" in proc.stderr and "--insecure" in proc.stderr


def test_another_consumers_order_id_reveals_nothing(grid: Grid) -> None:
    order = {
        "id": "shared-id-1",
        "kind": "lease",
        "hours": 1,
        "resources": {"accelerators": ["RTX-4090"], "count": 1, "max_price": 0.5},
    }
    with grid.coordinator.admin() as admin:
        other = admin.post("/api/v1/admin/keys", json={"name": "other"}).json()
        admin.post(
            "/api/v1/admin/mint",
            json={"key_id": other["key_id"], "amount": 10**7, "reference": "other"},
        ).raise_for_status()
    with grid.http() as c:
        mine = c.post(
            "/api/v1/orders", json=order, headers={"Authorization": f"Bearer {grid.api_key}"}
        )
        assert mine.status_code == 201, mine.text
        again = c.post(
            "/api/v1/orders", json=order, headers={"Authorization": f"Bearer {grid.api_key}"}
        )
        assert again.status_code == 409 and again.json()["error"]["data"]["state"]
        theirs = c.post(
            "/api/v1/orders", json=order, headers={"Authorization": f"Bearer {other['api_key']}"}
        )
        assert theirs.status_code == 409
        err = theirs.json()["error"]
        assert err["data"]["state"] is None and "taken" in err["message"]
        assert (
            c.get(
                "/api/v1/orders/shared-id-1",
                headers={"Authorization": f"Bearer {other['api_key']}"},
            ).status_code
            == 404
        )


def test_a_live_nodes_name_cannot_be_taken(grid: Grid) -> None:
    import time

    from test_grid import _signed_post

    body = {
        "protocol_version": PROTOCOL_VERSION,
        "name": "p0",
        "hardware": {},
        "engine": {},
        "slots": 1,
        "prefill_tps": 1,
        "decode_tps": 1,
        "offers": [{"model": MODEL, "prompt_price": 1, "output_price": 1}],
    }
    r = _signed_post(grid.url, NodeKey.generate(), "/api/v1/nodes/register", body, now=time.time())
    assert r.status_code == 409 and "p0" in r.json()["error"]["message"]
    body["name"] = "p-new"
    r = _signed_post(grid.url, NodeKey.generate(), "/api/v1/nodes/register", body, now=time.time())
    assert r.status_code == 200, r.text


def test_a_revoked_key_is_refused_at_once(grid: Grid) -> None:
    import openai as oa

    client = grid.client()
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage
    with grid.coordinator.admin() as admin:
        r = admin.post(f"/api/v1/admin/keys/{grid.key_id}/revoke")
        assert r.status_code == 200 and r.json()["changed"] is True
        assert admin.post("/api/v1/admin/keys/key_nope/revoke").status_code == 404
    before = len(grid.entries())
    with pytest.raises(oa.AuthenticationError, match="revoked"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert len(grid.entries()) == before


def test_a_handback_does_not_lower_reliability(tmp_path: Path, database_url: str) -> None:
    """A provider that hands work back (draining) is not blamed for it: the recorded outcome
    and the one reliability counts as blameless are the same word."""

    g = start_grid(tmp_path, database_url, [], credits=10)
    key = NodeKey.generate()

    def consumer() -> None:
        with contextlib.suppress(Exception):
            g.client(timeout=15).completions.create(model=MODEL, prompt="hi", max_tokens=4)

    async def provider() -> None:
        c = NodeClient(g.url, key)
        try:
            t, task = await _hand_provider_takes_a_task(c, "drainer", consumer)
            assert task is not None
            await c.call(
                f"/api/v1/tasks/{task['task_id']}/attempts/{task['attempt']}/fail",
                {"reason": "provider draining", "kind": "handback"},
            )
            await asyncio.to_thread(t.join, 30)
        finally:
            await c.close()

    try:
        asyncio.run(provider())
        market = g.coordinator.app.state.services.market.store
        assert market.reliability()[key.node_id] == pytest.approx(20 / 21)
    finally:
        g.verify()
        stop_grid(g)
