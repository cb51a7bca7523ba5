"""Batch lines in the one task queue (db/store.py, a real SQLite file): claimed after
interactive work whatever their age, charged the batch price, paid from the batch's
escrow with the line as the cause."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idlegrid.coordinator.db.store import Store, migrate
from idlegrid.coordinator.inference.candidates import batch_slots
from idlegrid.core import ledger
from idlegrid.core.batch.money import batch_escrow, escrow_account
from idlegrid.core.ledger import MICRO, Cause, Price

MODEL = "fake:1"
PRICE = Price(10 * MICRO, 40 * MICRO)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0  # every read is later: creation order is unambiguous
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate(url)
    s = Store(url, Clock())
    s.upsert_node(
        node_id="n1",
        public_key=b"\x01" * 32,
        name="n1",
        protocol_version=1,
        hardware={},
        engine={},
        slots=4,
        prefill_tps=1.0,
        decode_tps=1.0,
        offers={MODEL: PRICE},
    )
    yield s
    s.close()


def _task(
    store: Store,
    key_id: str,
    task_id: str,
    batch: dict[str, Any] | None,
    target: str | None = None,
) -> None:
    payload: dict[str, Any] = {"prompt": "x", "price_cap": [PRICE.prompt, PRICE.output]}
    if batch is not None:
        payload["batch"] = batch
    store.create_task(
        task_id=task_id,
        key_id=key_id,
        model_id=MODEL,
        kind="completion",
        payload=payload,
        hold=1_000,
        target_node_id=target,
        priority=int(batch is not None),
    )


def _funded_batch(store: Store, batch_id: str, custom_id: str) -> tuple[str, str, dict[str, Any]]:
    """A key with 10 credits, 5,000 µcr of them escrowed for `batch_id`, and a line's tag."""
    key_id, _ = store.create_api_key("k")
    consumer = ledger.consumer_account(key_id)
    store.post(ledger.mint("m", consumer, 10 * MICRO, Cause("deposit", "m")))
    store.post(batch_escrow(batch_id, consumer, 5_000))
    tag = {"id": batch_id, "custom_id": custom_id, "payer": escrow_account(batch_id)}
    return key_id, consumer, {**tag, "share_bps": 5_000}


def test_interactive_work_is_claimed_before_older_batch_lines(store: Store) -> None:
    key_id, consumer, tag = _funded_batch(store, "b1", "line-7")
    _task(store, key_id, "batch-1", tag)
    _task(store, key_id, "batch-2", {**tag, "custom_id": "line-8"})
    _task(store, key_id, "chat-1", None)
    # The line's hold came from the batch's escrow, not the consumer, naming the line.
    assert store.balance(escrow_account("b1")) == 3_000
    assert store.balance(consumer) == 10 * MICRO - 5_000 - 1_000
    held = [e for e in store.entries() if e["key"] == "hold:batch-1"]
    assert held[0]["cause"] == {"kind": "batch_line", "id": "b1/line-7"}

    order = [t.id for t in iter(lambda: store.claim("n1", [MODEL]), None)]
    assert order == ["chat-1", "batch-1", "batch-2"]

    # Settled at half the offer; the unused hold goes back to the batch's escrow.
    done = store.finish(
        "batch-1", 1, "n1", new_ids=[1, 2], prompt_tokens=3, finish_reason="length", fee_bps=0
    )
    assert done.state == "done"
    charge = ledger.Share("n1", 3, 2, Price(PRICE.prompt // 2, PRICE.output // 2)).charge()
    assert store.balance(ledger.accrual_account("n1")) == charge
    assert store.balance(escrow_account("b1")) == 3_000 + 1_000 - charge
    settle = [e for e in store.entries() if e["key"] == "settle:batch-1"][0]
    assert settle["cause"] == {"kind": "batch_line", "id": "b1/line-7"}


def _node(store: Store, node_id: str, engine: dict[str, Any] | None = None, **batch: Any) -> None:
    store.upsert_node(
        node_id=node_id,
        public_key=b"\x02" * 32,
        name=node_id,
        protocol_version=1,
        hardware={},
        engine=engine or {},
        slots=4,
        prefill_tps=1.0,
        decode_tps=1.0,
        offers={MODEL: PRICE},
        **batch,
    )


def test_a_provider_that_serves_no_batch_work_never_claims_a_line(store: Store) -> None:
    _node(store, "n1", batch=False)  # registers again, opting out
    key_id, consumer, tag = _funded_batch(store, "b2", "a")
    _task(store, key_id, "batch-x", tag)
    assert store.claim("n1", [MODEL]) is None
    # A provider with its own batch price takes it, at that price.
    _node(store, "n2", batch_price_bps=2_500)
    assert store.claim("n2", [MODEL]) is not None
    store.finish("batch-x", 1, "n2", new_ids=[1], prompt_tokens=0, finish_reason="stop", fee_bps=0)
    quarter = Price(PRICE.prompt // 4, PRICE.output // 4)
    assert store.balance(ledger.accrual_account("n2")) == ledger.token_cost(1, quarter.output)
    assert [n.batch for n in store.nodes()] == [False, True]


def test_a_node_whose_batch_slots_are_full_claims_interactive_work_only(store: Store) -> None:
    key_id, consumer, tag = _funded_batch(store, "b3", "a")
    _task(store, key_id, "batch-y", tag)
    assert store.claim("n1", [MODEL], batch_ok=False) is None
    _task(store, key_id, "chat-y", None)
    got = store.claim("n1", [MODEL], batch_ok=False)
    assert got is not None and got.id == "chat-y"
    got = store.claim("n1", [MODEL])
    assert got is not None and got.id == "batch-y"


def test_batch_slots_leave_the_engines_headroom_to_interactive_work(store: Store) -> None:
    (node,) = store.nodes()
    assert batch_slots(node) == 4
    _node(store, "n1", engine={"headroom": 1})
    node = next(n for n in store.nodes() if n.id == "n1")
    assert (node.slots, batch_slots(node)) == (4, 3)
    _node(store, "n1", engine={"headroom": 9})  # never below one slot
    node = next(n for n in store.nodes() if n.id == "n1")
    assert batch_slots(node) == 1


def test_a_line_routed_to_a_node_is_claimed_by_it_even_with_its_batch_slots_full(
    store: Store,
) -> None:
    """Routing counted the line in the node's batch slots (`in_flight`): the free slot
    that polls for it must take it, not leave it for the supervisor to untarget."""
    _node(store, "n2")
    key_id, consumer, tag = _funded_batch(store, "b4", "a")
    _task(store, key_id, "batch-free", tag)
    _task(store, key_id, "batch-mine", {**tag, "custom_id": "b"}, target="n1")
    _task(store, key_id, "batch-theirs", {**tag, "custom_id": "c"}, target="n2")
    got = store.claim("n1", [MODEL], batch_ok=False)
    assert got is not None and got.id == "batch-mine"
    assert store.claim("n1", [MODEL], batch_ok=False) is None  # nor any other line
