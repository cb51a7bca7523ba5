"""The coordinator, real agents (deterministic FakeEngine) and the official openai client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Price, Share
from idlegrid.engines.base import SamplingParams, generate_text
from idlegrid.engines.fake import FakeEngine
from idlegrid.protocol.signing import NodeKey
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
    wait_until,
)

MODEL = "fake:1"
FEE_BPS = 250


@dataclass
class Grid:
    coordinator: CoordinatorThread
    agents: list[AgentThread]
    key_id: str
    api_key: str
    # Clients a test forgets to close would be garbage-collected during a later test, whose
    # ResourceWarning (an error here) then names the wrong test; stop_grid closes them all.
    clients: list[openai.OpenAI] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.coordinator.url

    def client(self, **kw: object) -> openai.OpenAI:
        """An OpenAI client of this grid's key, closed by stop_grid."""
        c = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, **kw)  # type: ignore[arg-type]
        self.clients.append(c)
        return c

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=30)

    def admin(self) -> httpx.Client:
        """A client with the operator key: ledger, admin routes, every balance."""
        return self.coordinator.admin(timeout=30)

    def balance(self, account: str) -> int:
        with self.admin() as c:
            return int(c.get("/api/v1/status").json()["balances"].get(account, 0))

    def entries(self) -> list[dict[str, object]]:
        with self.admin() as c:
            entries: list[dict[str, object]] = c.get("/api/v1/ledger").json()["entries"]
            return entries

    def nodes(self) -> list[dict[str, object]]:
        with self.http() as c:
            nodes: list[dict[str, object]] = c.get("/api/v1/status").json()["nodes"]
            return nodes

    def verify(self) -> None:
        with self.admin() as c:
            result = c.get("/api/v1/ledger/verify").json()
        assert result == {"ok": True, "problems": []}


def start_grid(
    tmp_path: Path,
    database_url: str,
    engines: list[FakeEngine],
    credits: int = 10,
    **settings: object,
) -> Grid:
    defaults: dict[str, object] = dict(
        data_dir=tmp_path,
        database_url=database_url,
        port=free_port(),
        fee_bps=FEE_BPS,
        heartbeat_interval_s=0.3,
        node_timeout_s=1.5,
        stall_timeout_s=3.0,
        long_poll_s=5.0,
        queue_timeout_s=20.0,
    )
    coordinator = CoordinatorThread(CoordinatorSettings(**{**defaults, **settings}))  # type: ignore[arg-type]
    coordinator.start()
    agents = []
    for i, engine in enumerate(engines):
        a = AgentThread(
            make_agent(
                coordinator.url, [engine], f"p{i}", price=Price((10 + i) * MICRO, (40 + i) * MICRO)
            )
        )
        a.start()
        agents.append(a)
    wait_for_live(coordinator.url, len(engines))
    with coordinator.admin() as c:
        key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
        if credits:
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": credits * MICRO, "reference": "test"},
            ).raise_for_status()
    return Grid(coordinator, agents, key["key_id"], key["api_key"])


def stop_grid(grid: Grid) -> None:
    for c in grid.clients:
        c.close()
    for a in grid.agents:
        if a.thread and a.thread.is_alive():
            a.stop()
    grid.coordinator.stop()


@pytest.fixture
def grid(tmp_path: Path, database_url: str) -> Iterator[Grid]:
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL), FakeEngine(MODEL)])
    yield g
    g.verify()
    stop_grid(g)


def expected(prompt: str, max_tokens: int, **kw: object) -> str:
    return generate_text(
        FakeEngine(MODEL), prompt, max_tokens=max_tokens, params=SamplingParams(**kw)
    ).text  # type: ignore[arg-type]


def charge_for(prompt_tokens: int, output_tokens: int, price: Price) -> int:
    return Share("x", prompt_tokens, output_tokens, price).charge()


def test_completion_matches_engine_and_moves_exact_credits(grid: Grid) -> None:
    client = grid.client()
    consumer = ledger.consumer_account(grid.key_id)
    before = grid.balance(consumer)
    resp = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0
    )
    assert resp.choices[0].text == expected("The capital of France is", 12, temperature=0.0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens == len(FakeEngine(MODEL).tokenize("The capital of France is"))

    # Exactly one provider served it; its price decides the charge, the fee is split off.
    served = [n for n in grid.nodes() if n["earned"]]
    assert len(served) == 1
    offer = served[0]["offers"][MODEL]  # type: ignore[index]
    price = Price(offer["prompt_price"], offer["output_price"])
    charge = charge_for(resp.usage.prompt_tokens, 12, price)
    fee = charge * FEE_BPS // 10_000
    assert charge > 0 and fee > 0
    assert before - grid.balance(consumer) == charge
    assert served[0]["earned"] == charge - fee
    assert grid.balance(ledger.FEES) == fee
    assert grid.balance(ledger.ESCROW) == 0
    causes = [e for e in grid.entries() if e["cause"]["id"] == resp.id]  # type: ignore[index]
    assert [e["memo"] for e in causes] == ["hold", "settle"]


def test_streaming_completion_and_chat(grid: Grid) -> None:
    client = grid.client()
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected("Once upon a time", 20, temperature=0.0)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens == 8
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in streamed]
    assert "".join(pieces) == chat.choices[0].message.content


def test_seed_and_stop(grid: Grid) -> None:
    client = grid.client()
    a = client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0.9, seed=7)
    b = client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text == expected("x", 10, temperature=0.9, seed=7)
    full = expected("stop test", 30, temperature=0.0)
    word = full.split()[3]
    r = client.completions.create(
        model=MODEL, prompt="stop test", max_tokens=30, temperature=0, stop=[word]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(word)]


def _no_new_entries(grid: Grid, before: int) -> None:
    assert len(grid.entries()) == before


def test_bad_requests_are_refused_precisely_and_leave_no_entries(grid: Grid) -> None:
    client = grid.client()
    n = len(grid.entries())
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="nope:1b", prompt="hi", max_tokens=4)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as neg:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert neg.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{grid.url}/v1", api_key="ig-wrong", max_retries=0
        ).completions.create(model=MODEL, prompt="hi", max_tokens=4)
    with grid.http() as c:
        r = c.post(
            "/v1/completions",
            content=b'{"model": "fake:1", "prompt": ',
            headers={"Authorization": f"Bearer {grid.api_key}", "Content-Type": "application/json"},
        )
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": []},
            headers={"Authorization": f"Bearer {grid.api_key}"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    _no_new_entries(grid, n)


def test_empty_balance_is_402_before_any_work(tmp_path: Path, database_url: str) -> None:
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL)], credits=0)
    try:
        n = len(g.entries())
        with pytest.raises(openai.APIStatusError) as exc:
            g.client().completions.create(model=MODEL, prompt="hi", max_tokens=4)
        assert exc.value.status_code == 402
        assert exc.value.body["data"]["needed"] > 0  # type: ignore[index]
        _no_new_entries(g, n)
        assert g.agents[0].agent.served == 0
    finally:
        stop_grid(g)


def test_balance_spent_elsewhere_is_402_and_an_early_hand_over_is_taken_back(
    tmp_path: Path, database_url: str
) -> None:
    """The gateway hands a task to a waiting provider before its escrow is written when the
    key's last seen balance covered it; if the write then fails, nothing is kept."""
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL)], credits=1)
    try:
        client = g.client()
        agent = g.agents[0].agent
        wait_until(lambda: agent.channel is not None and agent.channel.open)
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
        wait_until(lambda: agent.served == 1)
        # Spent behind this coordinator's back (another process on the same database).
        consumer = ledger.consumer_account(g.key_id)
        store = g.coordinator.app.state.services.store
        store.post(
            ledger.make_entry(
                "elsewhere",
                ledger.Cause("test", "elsewhere"),
                [
                    ledger.Posting(consumer, -g.balance(consumer)),
                    ledger.Posting(ledger.ISSUER, g.balance(consumer)),
                ],
            )
        )
        n = len(g.entries())
        received = agent.channel.tasks_received  # type: ignore[union-attr]
        wait_until(
            lambda: (
                len(
                    g.coordinator.app.state.services.inference.hub._waiters.get(
                        agent.client.key.node_id, []
                    )
                )
                == 1
            )
        )  # its next poll is parked
        with pytest.raises(openai.APIStatusError) as exc:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
        assert exc.value.status_code == 402
        assert agent.channel.tasks_received == received + 1  # type: ignore[union-attr]
        _no_new_entries(g, n)
        # The provider's output for it was refused, nothing was paid, and it serves on.
        store.post(
            ledger.make_entry(
                "refill",
                ledger.Cause("test", "refill"),
                [ledger.Posting(ledger.ISSUER, -MICRO), ledger.Posting(consumer, MICRO)],
            )
        )
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
        wait_until(lambda: agent.served == 2)
        client.close()
        g.verify()
    finally:
        stop_grid(g)


def _signed_post(
    url: str,
    key: NodeKey,
    path: str,
    body: dict[str, object],
    *,
    now: float,
    nonce: str | None = None,
    tamper: bool = False,
) -> httpx.Response:
    raw = json.dumps(body).encode()
    headers = key.sign_headers("POST", path, raw, now=now, nonce=nonce)
    if tamper:
        raw = raw.replace(b"live", b"draining")
    with httpx.Client(base_url=url, trust_env=False) as c:
        return c.post(path, content=raw, headers=headers)


def test_node_signatures_refuse_bad_stale_and_replayed(grid: Grid) -> None:
    import time

    key = grid.agents[0].agent.client.key
    path = "/api/v1/nodes/heartbeat"
    ok = _signed_post(grid.url, key, path, {"state": "live"}, now=time.time(), nonce="n" * 16)
    assert ok.status_code == 200
    replay = _signed_post(grid.url, key, path, {"state": "live"}, now=time.time(), nonce="n" * 16)
    assert replay.status_code == 401 and "replay" in replay.json()["error"]["message"]
    stale = _signed_post(grid.url, key, path, {"state": "live"}, now=time.time() - 300)
    assert stale.status_code == 401 and "stale" in stale.json()["error"]["message"]
    tampered = _signed_post(grid.url, key, path, {"state": "live"}, now=time.time(), tamper=True)
    assert tampered.status_code == 401 and "signature" in tampered.json()["error"]["message"]
    stranger = _signed_post(grid.url, NodeKey.generate(), path, {}, now=time.time())
    assert stranger.status_code == 401
    with httpx.Client(base_url=grid.url, trust_env=False) as c:
        assert c.post(path, json={"state": "live"}).status_code == 401
        metrics = c.get("/metrics").text
    assert "idlegrid_node_auth_failures_total" in metrics


def test_dead_provider_mid_stream_is_replaced_and_only_committed_work_is_billed(
    tmp_path: Path, database_url: str
) -> None:
    slow = FakeEngine(MODEL, token_delay=0.05)
    g = start_grid(tmp_path, database_url, [slow, FakeEngine(MODEL, token_delay=0.05)])
    try:
        consumer = ledger.consumer_account(g.key_id)
        before = g.balance(consumer)
        stream = g.client().completions.create(
            model=MODEL,
            prompt="long story",
            max_tokens=60,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts: list[str] = []
        killed = None
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices:
                texts.append(chunk.choices[0].text)
            if killed is None and len(texts) >= 5:
                holder = next(n for n in g.nodes() if n["running"])
                killed = next(a for a in g.agents if a.agent.client.key.node_id == holder["id"])
                killed.kill()
        assert killed is not None
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 60
        # Continuation from the delivered tokens reproduces the uninterrupted answer.
        assert "".join(texts) == expected("long story", 60, temperature=0.0)
        entries = [e for e in g.entries() if e["cause"]["id"] == chunks[0].id]  # type: ignore[index]
        assert [e["memo"] for e in entries] == ["hold", "settle"]
        paid = sum(n["earned"] for n in g.nodes())  # type: ignore[misc]
        spent = before - g.balance(consumer)
        assert spent == paid + g.balance(ledger.FEES) and spent > 0
        # The dead provider sent no part commitment: its tokens stay in the answer, but
        # nobody could check them, so it is not paid and the consumer not charged for them
        # (issue 15); the survivor is paid for the part it committed.
        earned = {n["id"]: n["earned"] for n in g.nodes()}
        assert earned[killed.agent.client.key.node_id] == 0
        assert sum(1 for v in earned.values() if v) == 1
        g.verify()
    finally:
        stop_grid(g)


def test_failover_keeps_logprobs_and_the_echoed_prompts(tmp_path: Path, database_url: str) -> None:
    """A provider killed mid-answer with logprobs and echo: the next attempt's logprobs are
    checked against its own commitment (not the dead one's), the prompt's logprobs reach
    the consumer once, and the whole equals an uninterrupted answer."""
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL, token_delay=0.05) for _ in "ab"])
    try:
        kw: dict[str, Any] = dict(
            model=MODEL, prompt="long story", max_tokens=40, temperature=0, logprobs=1, echo=True
        )
        tokens: list[str] = []
        values: list[float | None] = []
        killed = None
        for chunk in g.client().completions.create(**kw, stream=True):
            lp = chunk.choices[0].logprobs if chunk.choices else None
            if lp is not None:
                tokens += lp.tokens or []
                values += lp.token_logprobs or []
            if killed is None and len(tokens) >= 15:
                holder = next(n for n in g.nodes() if n["running"])
                killed = next(a for a in g.agents if a.agent.client.key.node_id == holder["id"])
                killed.kill()
        assert killed is not None
        whole = g.client().completions.create(**kw)
        lp = whole.choices[0].logprobs
        assert lp is not None and whole.usage is not None
        assert whole.usage.completion_tokens == 40
        assert tokens == lp.tokens and values == lp.token_logprobs
        assert values.count(None) == 1  # the prompt's first token, sent once
        g.verify()
    finally:
        stop_grid(g)


def test_stalled_provider_is_replaced(tmp_path: Path, database_url: str) -> None:
    g = start_grid(
        tmp_path, database_url, [FakeEngine(MODEL, token_delay=3.0)], stall_timeout_s=1.0
    )
    try:
        fast = AgentThread(make_agent(g.url, [FakeEngine(MODEL)], "fast"))
        box: dict[str, object] = {}

        def call() -> None:
            box["r"] = g.client().completions.create(
                model=MODEL, prompt="p", max_tokens=5, temperature=0
            )

        t = threading.Thread(target=call)
        t.start()
        # The only provider takes the request and hangs; a second one joins later.
        wait_until(lambda: any(n["running"] for n in g.nodes()))
        fast.start()
        g.agents.append(fast)
        t.join(30)
        r = box["r"]
        assert r.choices[0].text == expected("p", 5, temperature=0.0)  # type: ignore[attr-defined]
        g.verify()
    finally:
        g.agents[0].kill()
        stop_grid(g)


def test_sigterm_drains_in_flight_work(tmp_path: Path, database_url: str) -> None:
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL, token_delay=0.02)])
    try:
        box: dict[str, object] = {}

        def call() -> None:
            box["r"] = g.client().completions.create(
                model=MODEL, prompt="drain", max_tokens=40, temperature=0
            )

        t = threading.Thread(target=call)
        t.start()
        wait_until(lambda: any(n["running"] for n in g.nodes()))
        g.agents[0].stop()
        t.join(30)
        assert box["r"].choices[0].text == expected("drain", 40, temperature=0.0)  # type: ignore[attr-defined]
        assert g.agents[0].agent.served == 1
        assert [n["state"] for n in g.nodes()] == ["draining"]
    finally:
        stop_grid(g)


def test_consumer_leaving_mid_stream_stops_the_work_and_bills_only_what_arrived(
    tmp_path: Path, database_url: str
) -> None:
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL, token_delay=0.05)])
    try:
        consumer = ledger.consumer_account(g.key_id)
        before = g.balance(consumer)
        body = {
            "model": MODEL,
            "prompt": "leave early",
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        with (
            g.http() as c,
            c.stream(
                "POST",
                "/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {g.api_key}"},
            ) as r,
        ):
            lines = r.iter_lines()
            events = [ln for ln in (next(lines) for _ in range(12)) if ln.startswith("data: ")]
            request_id = json.loads(events[0][6:])["id"]
        # Closing the response is the consumer leaving; the coordinator settles on its own.
        wait_until(
            lambda: (
                [e["memo"] for e in g.entries() if e["cause"]["id"] == request_id]
                == ["hold", "settle"]
            )
        )  # type: ignore[index]
        wait_until(lambda: not g.agents[0].agent.jobs)
        spent = before - g.balance(consumer)
        provider = next(n for n in g.nodes())
        assert 0 < spent < charge_for(200, 200, Price(11 * MICRO, 41 * MICRO))
        assert spent == provider["earned"] + g.balance(ledger.FEES)
        assert g.agents[0].agent.served == 0  # the agent stopped instead of finishing 200 tokens
        g.verify()
    finally:
        stop_grid(g)


def test_a_claim_that_never_reached_its_provider_is_taken_back(
    tmp_path: Path, database_url: str
) -> None:
    """A poll cancelled mid-claim leaves a row saying the provider holds a task it never got;
    the supervisor notices the row and the stream disagree, and the request is served."""
    from concurrent.futures import ThreadPoolExecutor

    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL, token_delay=0.05)])
    try:
        grid = g.coordinator.app.state.services
        node_id = g.agents[0].agent.client.key.node_id

        def ask(prompt: str) -> str:
            r = g.client(timeout=60).completions.create(
                model=MODEL, prompt=prompt, max_tokens=30, temperature=0
            )
            return r.choices[0].text

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, "first")
            wait_until(lambda: any(n["running"] for n in g.nodes()))
            second = pool.submit(ask, "second")
            wait_until(lambda: len(grid.store.queued_tasks()) == 1)
            # The claim a dying poll would have made: in the database only.
            claimed = grid.store.claim(node_id, [MODEL])
            assert claimed is not None and claimed.attempt == 1
            assert grid.inference.hub.get(claimed.id).attempt == 0
            assert first.result(timeout=60) == expected("first", 30, temperature=0.0)
            assert second.result(timeout=60) == expected("second", 30, temperature=0.0)
        g.verify()
    finally:
        stop_grid(g)
