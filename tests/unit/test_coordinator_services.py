"""Coordinator services without a server: a `Context` on a fresh SQLite file, a clock the
test moves, and the services built the way the app builds them (`app.compose`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idlegrid import PROTOCOL_VERSION
from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.app import compose
from idlegrid.coordinator.context import Context
from idlegrid.coordinator.db.store import Store, migrate
from idlegrid.coordinator.deps import Services
from idlegrid.coordinator.events import (
    AnswerFinished,
    Events,
    LiveNodesChanged,
    NodeRegistered,
    SupplyChanged,
)
from idlegrid.coordinator.supervisor import Supervisor
from idlegrid.core import ledger
from idlegrid.errors import Conflict, InvalidRequest, ModelNotFound, NoCapacity
from idlegrid.testbed.commits import commitment_b64

MODEL = "tiny:test"


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def grid(tmp_path: Path) -> Iterator[tuple[Services, Clock]]:
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    migrate(url)
    clock = Clock()
    store = Store(url, clock)
    settings = CoordinatorSettings(data_dir=tmp_path, hw_proofs=False)
    yield compose(Context(settings, store, clock)), clock
    store.close()


def body(name: str = "p0", **extra: Any) -> dict[str, Any]:
    """A registration body as the agent sends it (already validated by the route)."""
    return {
        "protocol_version": PROTOCOL_VERSION,
        "name": name,
        "hardware": {},
        "engine": {"engine": "fake"},
        "slots": 1,
        "prefill_tps": 100.0,
        "decode_tps": 50.0,
        "offers": [{"model": MODEL, "prompt_price": 1_000_000, "output_price": 2_000_000}],
        **extra,
    }


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---- events and the supervisor ------------------------------------------------------------


def test_events_run_in_subscription_order_sync_and_async() -> None:
    seen: list[str] = []
    ev = Events()

    async def second(e: NodeRegistered) -> None:
        seen.append(f"async {e.node_id}")

    ev.on(NodeRegistered, lambda e: seen.append(f"sync {e.node_id}"))
    ev.on(NodeRegistered, second)
    ev.on(SupplyChanged, lambda e: seen.append("other kind"))
    run(ev.emit(NodeRegistered("n1", {})))
    assert seen == ["sync n1", "async n1"]


def test_notify_from_a_thread_refuses_an_async_handler() -> None:
    ev = Events()

    async def handler(e: SupplyChanged) -> None:
        pass

    ev.on(SupplyChanged, handler)
    with pytest.raises(TypeError, match="SupplyChanged"):
        ev.notify(SupplyChanged("n1"))


def test_supervisor_passes_the_live_set_to_each_tick_in_order() -> None:
    calls: list[tuple[str, frozenset[str]]] = []

    async def live() -> frozenset[str]:
        return frozenset({"a"})

    def tick(name: str) -> Any:
        async def t(live_set: frozenset[str]) -> None:
            calls.append((name, live_set))

        return t

    run(Supervisor(live, [tick("market"), tick("inference")], interval_s=1.0).once())
    assert calls == [("market", frozenset({"a"})), ("inference", frozenset({"a"}))]


# ---- nodes ------------------------------------------------------------------------------------


def test_registration_reaches_every_domain_through_events(grid: tuple[Services, Clock]) -> None:
    svc, _ = grid
    seen: list[NodeRegistered] = []
    svc.ctx.events.on(NodeRegistered, seen.append)
    devices = [{"model": "rtx 4090", "count": 1, "vram_gb": 24.0, "price_h": 400_000}]
    answer = run(svc.nodes.register("n1", b"k" * 32, body(devices=devices)))
    assert answer["node_id"] == "n1"
    assert seen[0].body["devices"][0]["model"] == "RTX-4090"  # canonical before anyone sees it
    assert "n1" in svc.nodes.cache  # routable
    assert svc.market.store.supply()["n1"]["devices"][0]["model"] == "RTX-4090"  # market
    assert "n1" in run(svc.trust.status())["nodes"]  # trust


def test_a_bad_device_list_is_refused_before_anything_is_written(
    grid: tuple[Services, Clock],
) -> None:
    svc, _ = grid
    with pytest.raises(InvalidRequest) as err:
        run(
            svc.nodes.register(
                "n1",
                b"k" * 32,
                body(devices=[{"model": "no such card", "count": 1, "vram_gb": 1.0, "price_h": 1}]),
            )
        )
    assert err.value.param == "devices"
    assert svc.store.nodes() == []


def test_a_live_name_belongs_to_one_node_until_it_goes_quiet(grid: tuple[Services, Clock]) -> None:
    svc, clock = grid
    run(svc.nodes.register("n1", b"k" * 32, body("alice")))
    with pytest.raises(Conflict) as err:
        run(svc.nodes.register("n2", b"j" * 32, body("alice")))
    assert err.value.data["code"] == "name_taken"
    clock.now += svc.settings.node_timeout_s + 1
    run(svc.nodes.register("n2", b"j" * 32, body("alice")))


def test_an_old_protocol_is_refused(grid: tuple[Services, Clock]) -> None:
    svc, _ = grid
    with pytest.raises(Conflict, match="protocol version"):
        run(svc.nodes.register("n1", b"k" * 32, body(protocol_version=PROTOCOL_VERSION - 1)))


def test_nodes_tick_announces_who_went_quiet(grid: tuple[Services, Clock]) -> None:
    svc, clock = grid
    changes: list[LiveNodesChanged] = []
    svc.ctx.events.on(LiveNodesChanged, changes.append)
    run(svc.nodes.register("n1", b"k" * 32, body()))
    assert run(svc.nodes.tick()) == frozenset({"n1"})
    assert run(svc.nodes.tick()) == frozenset({"n1"})  # unchanged: no second event
    clock.now += svc.settings.node_timeout_s + 1
    assert run(svc.nodes.tick()) == frozenset()
    assert changes == [
        LiveNodesChanged(frozenset({"n1"}), frozenset()),
        LiveNodesChanged(frozenset(), frozenset({"n1"})),
    ]


# ---- inference ----------------------------------------------------------------------------------


def test_submit_names_what_is_missing(grid: tuple[Services, Clock]) -> None:
    svc, clock = grid
    with pytest.raises(ModelNotFound):
        run(svc.inference.submit("k1", MODEL, "completion", {}, 10, 10))
    run(svc.nodes.register("n1", b"k" * 32, body()))
    clock.now += svc.settings.node_timeout_s + 1
    with pytest.raises(NoCapacity):
        run(svc.inference.submit("k1", MODEL, "completion", {}, 10, 10))


def test_a_request_is_handed_over_served_and_settled(grid: tuple[Services, Clock]) -> None:
    svc, _ = grid
    key_id, _secret = svc.store.create_api_key("consumer")
    account = ledger.consumer_account(key_id)
    svc.store.post(ledger.mint("mint-1", account, 10 * ledger.MICRO, ledger.Cause("test", "1")))
    finished: list[AnswerFinished] = []
    svc.ctx.events.on(AnswerFinished, finished.append)

    async def scenario() -> tuple[Any, list[str]]:
        await svc.nodes.register("n1", b"k" * 32, body())
        poll = asyncio.ensure_future(svc.inference.poll("n1", [MODEL], 5.0))
        while not svc.inference.hub._waiters.get("n1"):  # the poll is parked
            await asyncio.sleep(0)
        task_id, stream = await svc.inference.submit(
            key_id, MODEL, "completion", {"prompt": "hi"}, 4, 3
        )
        task = await poll
        assert task.id == task_id
        await svc.inference.upload("n1", task_id, 1, 0, [(7, "a"), (8, "b")])
        # The provider claims 3 prompt tokens; its commitment fixes 2, which is billed.
        blob = commitment_b64([7, 8], 2, task.payload["seed"])
        done = await svc.inference.finish(
            "n1", task_id, 1, prompt_tokens=3, finish_reason="length", commitment=blob
        )
        kinds = [e.kind async for e in svc.inference.events(stream)]
        return done, kinds

    done, kinds = run(scenario())
    assert kinds == ["pieces", "done"]
    assert (done.state, done.output_tokens, done.prompt_tokens) == ("done", 2, 2)
    # 2 prompt tokens at 1 cr/M and 2 output tokens at 2 cr/M; the rest of the hold is back.
    assert svc.store.balance(account) == 10 * ledger.MICRO - 2 * 1 - 2 * 2
    assert svc.store.verify_ledger() == []
    assert [(e.node_id, e.task.id, e.part) for e in finished] == [("n1", done.id, False)]


def _recording_claims(svc: Services, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ids of the tasks polls took from the queue (Store.claim), as they are taken."""
    claimed: list[str] = []
    claim = svc.store.claim

    def recording(*args: Any, **kwargs: Any) -> Any:
        task = claim(*args, **kwargs)
        if task is not None:
            claimed.append(task.id)
        return task

    monkeypatch.setattr(svc.store, "claim", recording)
    return claimed


def test_a_request_for_a_free_node_between_polls_goes_to_its_next_parked_poll(
    grid: tuple[Services, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node has a free slot but no poll parked (its poll is between two claims): the
    request waits for that poll to park and is handed to it, not queued behind claims."""
    svc, _ = grid
    key_id, _secret = svc.store.create_api_key("consumer")
    account = ledger.consumer_account(key_id)
    svc.store.post(ledger.mint("mint-1", account, 10 * ledger.MICRO, ledger.Cause("test", "1")))
    claimed = _recording_claims(svc, monkeypatch)
    hub = svc.inference.hub

    async def scenario() -> tuple[str, str]:
        await svc.nodes.register("n1", b"k" * 32, body())
        submit = asyncio.ensure_future(
            svc.inference.submit(key_id, MODEL, "completion", {"prompt": "hi"}, 4, 3)
        )
        while not hub._expecting.get("n1") and not submit.done():  # waits for a poll
            await asyncio.sleep(0)
        task = await svc.inference.poll("n1", [MODEL], 5.0)  # claims nothing, then parks
        task_id, _stream = await submit
        return task.id, task_id

    polled, submitted = run(scenario())
    assert polled == submitted
    assert claimed == []  # handed over, never claimed from the queue
    assert not hub._expecting.get("n1")


def test_a_request_no_poll_parks_for_is_queued_and_claimed(
    grid: tuple[Services, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No poll of the free node parks within the hand-over wait: the request is queued as
    before and the node's next poll claims it."""
    svc, _ = grid
    key_id, _secret = svc.store.create_api_key("consumer")
    account = ledger.consumer_account(key_id)
    svc.store.post(ledger.mint("mint-1", account, 10 * ledger.MICRO, ledger.Cause("test", "1")))
    claimed = _recording_claims(svc, monkeypatch)

    async def scenario() -> tuple[str, str]:
        await svc.nodes.register("n1", b"k" * 32, body())
        task_id, _stream = await svc.inference.submit(
            key_id, MODEL, "completion", {"prompt": "hi"}, 4, 3
        )
        task = await svc.inference.poll("n1", [MODEL], 5.0)
        return task.id, task_id

    polled, submitted = run(scenario())
    assert polled == submitted
    assert claimed == [submitted]
    assert not svc.inference.hub._expecting.get("n1")


def test_an_answer_without_a_valid_commitment_is_a_failed_unpaid_attempt(
    grid: tuple[Services, Clock],
) -> None:
    """Issue 15: a missing or malformed commitment is a failed answer: nothing is paid or
    charged for it, it counts against the provider, and the request goes on (and, after the
    last attempt, fails). A handed-back part without a part commitment is not paid either."""
    svc, _ = grid
    key_id, _secret = svc.store.create_api_key("consumer")
    account = ledger.consumer_account(key_id)
    svc.store.post(ledger.mint("mint-1", account, 10 * ledger.MICRO, ledger.Cause("test", "1")))
    start = svc.store.balance(account)

    async def attempt(n: int, task_id: str | None) -> tuple[str, Any]:
        poll = asyncio.ensure_future(svc.inference.poll("n1", [MODEL], 5.0))
        stream = None
        if task_id is None:  # a new request, handed to the parked poll
            while not svc.inference.hub._waiters.get("n1"):
                await asyncio.sleep(0)
            task_id, stream = await svc.inference.submit(
                key_id, MODEL, "completion", {"prompt": "hi"}, 4, 8
            )
        task = await poll  # a requeued one is claimed from the queue at once
        assert (task.id, task.attempt) == (task_id, n)
        await svc.inference.upload("n1", task_id, n, 0, [(7 + n, "x")])
        return task_id, stream

    async def scenario() -> tuple[str, list[str]]:
        await svc.nodes.register("n1", b"k" * 32, body())
        task_id, stream = await attempt(1, None)
        with pytest.raises(InvalidRequest, match="no commitment.*another provider"):
            await svc.inference.finish("n1", task_id, 1, prompt_tokens=2, finish_reason="length")
        await attempt(2, task_id)
        with pytest.raises(InvalidRequest, match="malformed commitment"):
            await svc.inference.finish(
                "n1", task_id, 2, prompt_tokens=2, finish_reason="length", commitment="AAAA"
            )
        await attempt(3, task_id)
        # Handed back with its token delivered and no part commitment: unpaid; the last try.
        await svc.inference.give_up("n1", task_id, 3, "handback")
        assert stream is not None
        kinds = [e.kind async for e in svc.inference.events(stream)]
        return task_id, kinds

    task_id, kinds = run(scenario())
    assert kinds[-1] == "failed"
    task = svc.store.get_task(task_id)
    assert task is not None and task.state == "failed" and "3 attempts" in (task.error or "")
    assert task.delivered_ids == [8, 9, 10]  # the consumer saw them; nobody is paid for them
    assert svc.store.balance(account) == start
    assert svc.store.balance(ledger.accrual_account("n1")) == 0
    assert svc.store.verify_ledger() == []
    # Two failed answers count against it (the hand-back is blameless): (1 + 19) / (3 + 20).
    assert svc.market.store.reliability()["n1"] == pytest.approx(20 / 23)
