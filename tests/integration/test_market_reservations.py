"""Inference reservations on a real local grid: the owner's requests go to its reserved
provider and are covered by the order (not charged per token), other consumers get that
provider only as spare capacity, and the SLO is judged on the owner's requests only."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import openai
import test_market as tm
from sqlalchemy import select

from idlegrid.coordinator.trust.tables import TrustCommitment
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import wait_until

MODEL = tm.MODEL
# The reserved provider is the only RTX-4090: an order for that card cannot move elsewhere.
PROVIDERS = (
    ("res", "RTX-4090", 1, "eu-west", 0.20),
    ("q1", "RTX-3060", 1, "eu-west", 0.30),
    ("q2", "RTX-3060", 1, "eu-west", 0.30),
)


def reserve(m: tm.Market, order_id: str, **resources: Any) -> dict[str, Any]:
    with m.http() as c:
        r = c.post(
            "/api/v1/orders",
            json={
                "id": order_id,
                "kind": "inference",
                "model": MODEL,
                "hours": 1,
                "resources": {"accelerators": ["RTX-4090"], "max_price": 1, **resources},
            },
        )
    assert r.status_code == 201 and r.json()["state"] == "active", r.text
    (leg,) = r.json()["placement"]["legs"]
    assert leg["provider"] == m.node_ids["res"]
    return r.json()  # type: ignore[no-any-return]


def second_key(m: tm.Market) -> tuple[str, str]:
    with m.admin() as c:
        key = c.post("/api/v1/admin/keys", json={"name": "b"}).json()
        c.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 20 * MICRO, "reference": "consumer-b"},
        ).raise_for_status()
    return key["key_id"], key["api_key"]


def served_by(m: tm.Market, task_id: str) -> str | None:
    task = m.coordinator.app.state.services.store.get_task(task_id)
    assert task is not None and task.state == "done", task
    return task.node_id  # type: ignore[no-any-return]


def charged(m: tm.Market, task_id: str, key_id: str) -> int:
    """What the consumer paid for a request, from its ledger entries (hold less refund)."""
    consumer = ledger.consumer_account(key_id)
    return -sum(
        p["amount"] for e in m.entries(task_id) for p in e["postings"] if p["account"] == consumer
    )


def committed(m: tm.Market, task_id: str) -> list[str]:
    """The providers whose commitments trust stored for a request (what audits draw on)."""
    with m.coordinator.app.state.services.store.read() as s:
        q = select(TrustCommitment.node_id).where(TrustCommitment.task_id == task_id)
        return list(s.scalars(q))


def ask(client: openai.OpenAI, prompt: str, max_tokens: int = 6) -> tuple[str, str]:
    """A request: its id (the task's) and where it was routed first, and why."""
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens
    )
    return raw.parse().id, raw.headers["x-idlegrid-route"]


def stop(m: tm.Market) -> None:
    for a in m.agents.values():
        if a.thread and a.thread.is_alive():
            a.stop()
    m.coordinator.stop()


def test_reserved_requests_land_on_the_reservation_uncharged_while_another_consumer_loads(
    tmp_path: Path, database_url: str
) -> None:
    engines = {name: FakeEngine(MODEL, token_delay=0.02) for name, *_ in PROVIDERS}
    # A long grace: P stays A's between A's requests however slow this machine is.
    m = tm.start_market(
        tmp_path, database_url, PROVIDERS, engines=engines, reservation_grace_s=60.0
    )
    p = m.node_ids["res"]
    key_b, api_b = second_key(m)
    a_client = openai.OpenAI(base_url=f"{m.url}/v1", api_key=m.api_key, max_retries=0)
    b_client = openai.OpenAI(base_url=f"{m.url}/v1", api_key=api_b, max_retries=0)
    try:
        order = reserve(m, "R1")
        consumer_a = ledger.consumer_account(m.key_id)
        balance_a = m.balance(consumer_a)
        first = ask(a_client, "a first")
        # B loads the grid from three threads: one more than the unreserved providers' slots,
        # so B would spill onto P if P were spare.
        done = threading.Event()
        b_asked: list[tuple[str, str]] = []
        errors: list[BaseException] = []

        def load(i: int) -> None:
            try:
                n = 0
                while not done.is_set():
                    b_asked.append(ask(b_client, f"b{i} {n}", max_tokens=8))
                    n += 1
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(b_asked) >= 2, timeout_s=30)
        a_asked = [first] + [ask(a_client, f"a {i}") for i in range(8)]
        done.set()
        for t in threads:
            t.join(30)
        assert not errors, errors
        # Every request of A went to its reserved provider, and the header says why.
        for task_id, route in a_asked:
            assert route.startswith(f"{p[:12]}: reserved by order R1"), route
            assert served_by(m, task_id) == p
            # Covered by the order: nothing held, nothing settled, no per-token charge...
            assert m.entries(task_id) == [], task_id
            # ...and its commitment kept for audit like any paid answer's.
            wait_until(lambda t=task_id: committed(m, t) == [p])  # stored just after the answer
        assert m.balance(consumer_a) == balance_a
        # B was served by the unreserved providers meanwhile (P was A's), and paid per token.
        assert len(b_asked) >= 3
        for task_id, route in b_asked:
            assert served_by(m, task_id) != p, route
            assert charged(m, task_id, key_b) > 0
        # The order is what pays the reserved provider: its accrual runs meanwhile.
        with m.http() as c:
            wait_until(lambda: c.get("/api/v1/orders/R1").json()["spent"] > 0)
        assert order["budget"] > 0

        # P busy with A's own long answer: A's next request falls back, charged per token.
        stream = a_client.completions.create(
            model=MODEL, prompt="a long one", max_tokens=80, stream=True
        )
        with stream:
            chunks = iter(stream)
            stream_id = next(chunks).id
            before = m.balance(consumer_a)
            task_id, route = ask(a_client, "a while busy")
            assert "fallback, reserved provider(s) of order R1 busy" in route, route
            assert "charged per token" in route
            assert served_by(m, task_id) != p
            cost = charged(m, task_id, m.key_id)
            assert cost > 0 and m.balance(consumer_a) == before - cost
            for _ in chunks:
                pass
        wait_until(
            lambda: m.coordinator.app.state.services.store.get_task(stream_id).state == "done"
        )
        assert served_by(m, stream_id) == p and m.entries(stream_id) == []

        # P dies: the order cannot be re-placed (the only RTX-4090), A pays per token again.
        m.agents["res"].kill()
        with m.http() as c:
            wait_until(lambda: c.get("/api/v1/orders/R1").json()["state"] == "open", 30)
        before = m.balance(consumer_a)
        task_id, route = ask(a_client, "a after the reserved provider died")
        # Routed as a fallback (the order's reservation may outlive P by one market tick).
        assert "reserved by" not in route and not route.startswith(p[:12]), route
        assert served_by(m, task_id) != p
        cost = charged(m, task_id, m.key_id)
        assert cost > 0 and m.balance(consumer_a) == before - cost
        m.verify()
    finally:
        a_client.close()
        b_client.close()
        stop(m)


def test_slo_misses_of_other_consumers_on_a_reserved_provider_refund_nothing(
    tmp_path: Path, database_url: str
) -> None:
    # ~20 tokens/s on every provider; the order asks for 50.
    providers = PROVIDERS[:2]
    engines = {name: FakeEngine(MODEL, token_delay=0.05) for name, *_ in providers}
    m = tm.start_market(tmp_path, database_url, providers, engines=engines)
    p = m.node_ids["res"]
    _, api_b = second_key(m)
    a_client = openai.OpenAI(base_url=f"{m.url}/v1", api_key=m.api_key, max_retries=0)
    b_client = openai.OpenAI(base_url=f"{m.url}/v1", api_key=api_b, max_retries=0)
    try:
        reserve(m, "S1", min_tokens_per_s=50)
        # B's first request takes the unreserved provider; its second spills onto P.
        stream = b_client.completions.create(model=MODEL, prompt="b", max_tokens=40, stream=True)
        with stream:
            chunks = iter(stream)
            next(chunks)
            task_id, route = ask(b_client, "b spills over", max_tokens=10)
            for _ in chunks:
                pass
        assert route.startswith(f"{p[:12]}: spare capacity of a reserved provider"), route
        assert served_by(m, task_id) == p
        finished = time.time()
        # Several accrual windows after B's slow answer on P are settled: no refund.
        with m.http() as c:

            def settled_past_b() -> bool:
                o = c.get("/api/v1/orders/S1").json()
                return bool(o["accrued_until"] and o["accrued_until"] > finished + 1.0)

            wait_until(settled_past_b, timeout_s=30)
            assert c.get("/api/v1/orders/S1").json()["refunded"] == 0
        assert not [e for e in m.entries("S1") if e["memo"] == "slo-refund"]
        # The owner's own slow request under the reservation does count.
        task_id, route = ask(a_client, "a slow", max_tokens=10)
        assert "reserved by order S1" in route and served_by(m, task_id) == p
        with m.http() as c:
            wait_until(lambda: c.get("/api/v1/orders/S1").json()["refunded"] > 0, 30)
        m.verify()
    finally:
        a_client.close()
        b_client.close()
        stop(m)


def test_a_reserved_provider_without_the_inference_stake_serves_no_covered_requests(
    tmp_path: Path, database_url: str
) -> None:
    # The auction asks stake_per_device per card (P: 1 card); paid inference asks twice
    # that. Covered requests are escrowed at 0 but must not bypass that rule.
    providers = (("res", "RTX-4090", 1, "eu-west", 0.20), ("q", "RTX-3060", 2, "eu-west", 0.30))
    m = tm.start_market(tmp_path, database_url, providers, inference_stake=2 * tm.STAKE)
    p = m.node_ids["res"]
    client = openai.OpenAI(base_url=f"{m.url}/v1", api_key=m.api_key, max_retries=0)
    try:
        reserve(m, "R2")
        market = m.coordinator.app.state.services.market
        assert p not in market.inference_staked and m.node_ids["q"] in market.inference_staked
        task_id, route = ask(client, "a")
        assert "fallback, reserved provider(s) of order R2 unavailable" in route, route
        assert served_by(m, task_id) == m.node_ids["q"]
        assert charged(m, task_id, m.key_id) > 0
        m.verify()
    finally:
        client.close()
        stop(m)


def test_a_batch_line_on_the_reserved_provider_yields_to_its_owner(
    tmp_path: Path, database_url: str
) -> None:
    # One provider, reserved by A, idle: B's batch lines take it as spare capacity.
    providers = PROVIDERS[:1]
    engines = {"res": FakeEngine(MODEL, token_delay=0.05)}
    m = tm.start_market(tmp_path, database_url, providers, engines=engines, batch_in_flight=1)
    p = m.node_ids["res"]
    _, api_b = second_key(m)
    a_client = openai.OpenAI(base_url=f"{m.url}/v1", api_key=m.api_key, max_retries=0)
    b_client = openai.OpenAI(base_url=f"{m.url}/v1", api_key=api_b, max_retries=0)
    try:
        reserve(m, "R3")
        lines = [
            {
                "custom_id": f"long-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": MODEL, "prompt": f"a long line {i}", "max_tokens": 40},
            }
            for i in range(2)
        ]
        data = "".join(json.dumps(x) + "\n" for x in lines).encode()
        upload = b_client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = b_client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
        store = m.coordinator.app.state.services.store
        wait_until(lambda: any(t.node_id == p for t in store.running_tasks()), 60)
        # A's request does not fall back to per-token pay: the batch line yields P's slot.
        task_id, route = ask(a_client, "a")
        assert route.startswith(
            f"{p[:12]}: reserved by order R3: busy, a batch line there yields its slot"
        ), route
        assert served_by(m, task_id) == p and m.entries(task_id) == []
        with m.http() as c:  # the line was handed back mid-answer, to continue later
            assert 'idlegrid_failovers_total{reason="handback"} 1.0' in c.get("/metrics").text

        def ended() -> bool:
            return b_client.batches.retrieve(batch.id).status == "completed"

        wait_until(ended, 120, 0.1)
        m.verify()
    finally:
        a_client.close()
        b_client.close()
        stop(m)
