"""The coordinator's durable state behind one class: SQLite by default, any SQLAlchemy URL.

Every method is one transaction. Claims and ledger appends are compare-and-set updates so
that two agents never hold one task and no balance goes negative, on SQLite or PostgreSQL.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from idlegrid.coordinator.db.ledger import STAKES_MOVED, LedgerStore
from idlegrid.coordinator.db.nodes import NodeStore
from idlegrid.coordinator.db.tables import (
    Account,
    Attempt,
    Node,
    Offer,
    Task,
    table,
)
from idlegrid.coordinator.views import TaskView, new_task_view
from idlegrid.core import ledger, reservations, routing
from idlegrid.core.batch.money import batch_price, line_cause, provider_share
from idlegrid.core.ledger import Price, Share
from idlegrid.core.tasks import TaskState, payable_tokens, should_retry, transition
from idlegrid.errors import InsufficientCredits, StaleAttempt

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


READ_ONLY = "idlegrid_read_only"


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine; SQLite gets WAL and write-ahead locking so writers queue, not fail."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event decide how transactions start (see below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # BEGIN IMMEDIATE takes the write lock up front; a deferred transaction that
            # upgrades later can fail with SQLITE_BUSY instead of waiting its turn. Reads
            # (Store.read) begin deferred: in WAL mode they never wait for, or block, a writer.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(url: str) -> None:
    """Bring the database schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


_ACC = Account.__table__.c
# Core statements on the tables (see db/ledger.py for why not the ORM classes).
_INSERT_TASK = insert(table(Task))
_BALANCE = select(_ACC.balance).where(_ACC.id == bindparam("acct"))
_INSERT_ATTEMPT = insert(table(Attempt))


def _payer(t: Task) -> str:
    """Who a task's hold came from: the consumer, or a batch's escrow for a batch line."""
    tag = (t.payload or {}).get("batch")
    return str(tag["payer"]) if tag else ledger.consumer_account(t.key_id)


def _cause(t: Task) -> ledger.Cause | None:
    """What a task's entries name as their cause: a batch line's batch and custom_id."""
    tag = (t.payload or {}).get("batch")
    return line_cause(tag["id"], tag["custom_id"]) if tag else None


def _task_view(t: Task) -> TaskView:
    return TaskView(
        t.id,
        t.key_id,
        t.model_id,
        t.kind,
        dict(t.payload),
        t.state,
        t.attempt,
        t.node_id,
        t.hold,
        list(t.delivered_ids or []),
        t.prompt_tokens,
        t.output_tokens,
        t.finish_reason,
        t.error,
        t.answer,
    )


def _claim_price(t: Task, offer: Offer | None, node: Node | None, now: float) -> Price | None:
    """What a claim of `t` is charged per token at this offer: its price, 0 when the
    order that reserved this node for the consumer covers it (core/reservations.py), or
    for a batch line the node's batch price; None if the node cannot take it."""
    if offer is None:
        return None
    if reservations.covered((t.payload or {}).get("reservation"), offer.node_id, now):
        return reservations.COVERED
    price = Price(offer.prompt_price, offer.output_price)
    tag = (t.payload or {}).get("batch")
    if not tag:
        return price
    serves, own = (node.batch, node.batch_price_bps) if node is not None else (False, None)
    return batch_price(price, provider_share(serves, own, tag.get("share_bps")))


class Store(NodeStore, LedgerStore):
    """Durable state: nodes, offers, keys, tasks and the ledger."""

    def __init__(self, url: str, clock: Callable[[], float]) -> None:
        self.url = url
        self.clock = clock
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        sqlite = url.startswith("sqlite")
        self._write_turn: Any = threading.RLock() if sqlite else contextlib.nullcontext()
        # Called after a transaction that moved stake commits: who may serve paid work is
        # read from stakes (compose() points this at the market's invalidate).
        self.on_stakes_moved: Callable[[], None] = lambda: None
        # Accounts come into being on first use: one INSERT .. ON CONFLICT DO NOTHING where
        # the dialect has it, instead of a lookup and an insert.
        self._ensure_accounts: Any = None
        if self.engine.dialect.name in ("sqlite", "postgresql"):
            dialect = importlib.import_module(f"sqlalchemy.dialects.{self.engine.dialect.name}")
            self._ensure_accounts = dialect.insert(table(Account)).on_conflict_do_nothing(
                index_elements=["id"]
            )

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        # SQLite: writers of this process take turns here. Left to SQLite, waiting writers
        # sleep in its busy handler's growing back-off while the lock sits free, and
        # throughput collapses under concurrency (measured: 43 vs 200+ orders/s).
        with self._write_turn, self._sessions() as session:
            with session.begin():
                yield session
            if session.info.pop(STAKES_MOVED, False):
                self.on_stakes_moved()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction: no write lock, so dashboards never stall writers."""
        with self.engine.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            with Session(bind=conn, expire_on_commit=False) as session, session.begin():
                yield session

    def exists(self, query: Any) -> bool:
        """Whether `query` has a row, read without the write lock (for periodic checks
        that usually find nothing: on SQLite every write transaction queues writers)."""
        with self.read() as s:
            return s.execute(query.limit(1)).first() is not None

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()

    # ---- tasks -------------------------------------------------------------------------

    def create_task(
        self,
        *,
        task_id: str,
        key_id: str,
        model_id: str,
        kind: str,
        payload: dict[str, Any],
        hold: int,
        target_node_id: str | None,
        claim_for: tuple[str, Price] | None = None,
        keep: int = 0,
        priority: int = 0,
    ) -> tuple[TaskView, int]:
        """Escrow the request's worst-case cost and queue it, atomically (or InsufficientCredits);
        the task and the consumer's balance after the hold.

        `keep`: what must be left after the hold (the holds of sibling choices of the same
        request, escrowed next), else nothing is written.

        With `claim_for` (node, price) the task is created already claimed by that node,
        attempt 1: the hand-over to a waiting long poll needs no second transaction.
        A batch line (`payload["batch"]`) is paid from its batch's escrow, and the balance
        returned is that escrow's.
        """
        now = self.clock()
        view = new_task_view(
            task_id, key_id, model_id, kind, payload, hold, claim_for[0] if claim_for else None
        )
        tag = payload.get("batch")
        consumer = str(tag["payer"]) if tag else ledger.consumer_account(key_id)
        cause = line_cause(tag["id"], tag["custom_id"]) if tag else None
        with self.tx() as s:
            s.execute(
                _INSERT_TASK,
                {
                    "id": view.id,
                    "key_id": key_id,
                    "model_id": model_id,
                    "kind": kind,
                    "payload": payload,
                    "state": view.state,
                    "attempt": view.attempt,
                    "node_id": view.node_id,
                    "target_node_id": None if claim_for else target_node_id,
                    "hold": hold,
                    "priority": priority,
                    "delivered_ids": [],
                    "prompt_tokens": 0,
                    "output_tokens": 0,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            if claim_for:
                s.execute(
                    _INSERT_ATTEMPT,
                    {
                        "task_id": task_id,
                        "attempt": 1,
                        "node_id": view.node_id,
                        "prompt_price": claim_for[1].prompt,
                        "output_price": claim_for[1].output,
                        "started_at": now,
                        "output_tokens": 0,
                    },
                )
            if hold:  # a free request (a provider at price 0) moves no credits
                try:
                    self._post(s, ledger.request_hold(task_id, consumer, hold, cause))
                except InsufficientCredits as exc:  # the 402 names what the request needs
                    available = int(exc.data["available"])
                    raise InsufficientCredits(consumer, hold + keep, available) from None
            balance = s.scalar(_BALANCE, {"acct": consumer}) or 0
            if balance < keep:  # raising rolls the transaction back: no hold, no task
                raise InsufficientCredits(consumer, needed=hold + keep, available=balance + hold)
        return view, balance

    def get_task(self, task_id: str) -> TaskView | None:
        """A task by id."""
        with self.tx() as s:
            t = s.get(Task, task_id)
            return _task_view(t) if t else None

    def claim(
        self,
        node_id: str,
        models: Sequence[str],
        covered_only: bool = False,
        batch_ok: bool = True,
    ) -> TaskView | None:
        """Claim a queued task for this node (targeted at it or at nobody), first come first
        served, except that work handed back by a failed provider goes before new work.

        A task escrowed at a price below this node's offer is left for a cheaper provider.
        `covered_only`: the node's reservation owner is using it (core/reservations.kept),
        so it takes only work that reservation covers. `batch_ok` False: the node's batch
        slots are full (counting work routed to it), so it takes no batch line (priority 1)
        but one routed to it, and interactive work.
        """
        now = self.clock()
        with self.tx() as s:
            candidates = s.scalars(
                select(Task)
                .where(
                    Task.state == TaskState.QUEUED.value,
                    Task.model_id.in_(list(models)),
                    (Task.target_node_id == node_id) | Task.target_node_id.is_(None),
                )
                # A line routed to this node was counted in its batch slots when it was
                # routed: it is taken even when they are full (with it), or it would sit
                # until the supervisor untargets it (bench_batch's refill p95: 344 ms).
                .where((Task.priority <= (1 if batch_ok else 0)) | (Task.target_node_id == node_id))
                .order_by(Task.priority, (Task.attempt > 0).desc(), Task.created_at)
                .limit(16)
            ).all()
            price = {
                o.model_id: o for o in s.scalars(select(Offer).where(Offer.node_id == node_id))
            }
            node = s.get(Node, node_id)
            # Structured outputs: only an engine that names a grammar engine may take them.
            constrains = bool(node is not None and (node.engine or {}).get("grammar"))
            for t in candidates:
                cap = (t.payload or {}).get("price_cap")
                offer = price.get(t.model_id)
                charged = _claim_price(t, offer, node, now)
                tag = (t.payload or {}).get("reservation")
                if covered_only and not reservations.covered(tag, node_id, now):
                    continue
                if charged is None or (cap and not routing.within(charged, Price(*cap))):
                    continue
                if (t.payload or {}).get("grammar") and not constrains:
                    continue
                transition(TaskState(t.state), "claim")
                attempt = t.attempt + 1  # read before the update refreshes `t`
                # Compare-and-set: only one claimant sees rowcount 1, on any database.
                res = s.execute(
                    update(Task)
                    .where(
                        Task.id == t.id,
                        Task.state == TaskState.QUEUED.value,
                        Task.attempt == attempt - 1,
                    )
                    .values(
                        state=TaskState.RUNNING.value,
                        attempt=attempt,
                        node_id=node_id,
                        target_node_id=None,
                        updated_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                if res.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                s.add(
                    Attempt(
                        task_id=t.id,
                        attempt=attempt,
                        node_id=node_id,
                        prompt_price=charged.prompt,
                        output_price=charged.output,
                        started_at=now,
                    )
                )
                s.flush()
                s.refresh(t)
                return _task_view(t)
        return None

    def _running(self, s: Session, task_id: str, attempt: int, node_id: str | None) -> Task:
        t = s.get(Task, task_id, with_for_update=True)
        if (
            t is None
            or t.state != TaskState.RUNNING.value
            or t.attempt != attempt
            or (node_id is not None and t.node_id != node_id)
        ):
            raise StaleAttempt(task_id, attempt)
        return t

    def _end_attempt(
        self, s: Session, t: Task, outcome: str, new_ids: Sequence[int], committed: bool
    ) -> None:
        a = s.get(Attempt, (t.id, t.attempt))
        assert a is not None
        a.ended_at = self.clock()
        a.outcome = outcome
        a.output_tokens = len(new_ids)
        a.committed = committed
        t.delivered_ids = [*t.delivered_ids, *new_ids]
        t.output_tokens = len(t.delivered_ids)

    def _shares(self, s: Session, t: Task, prompt_tokens: int) -> list[Share]:
        attempts = s.scalars(
            select(Attempt).where(Attempt.task_id == t.id).order_by(Attempt.attempt)
        ).all()
        shares = []
        for a in attempts:
            # The prompt is billed once, to the provider that finished the request; each
            # provider is paid for the output tokens it delivered under a valid commitment.
            prompt = prompt_tokens if a.attempt == t.attempt else 0
            output = payable_tokens(a.output_tokens, a.committed is not False)
            if prompt or output:
                shares.append(
                    Share(a.node_id, prompt, output, Price(a.prompt_price, a.output_price))
                )
        return shares

    def finish(
        self,
        task_id: str,
        attempt: int,
        node_id: str | None,
        *,
        new_ids: Sequence[int],
        prompt_tokens: int,
        finish_reason: str,
        fee_bps: int,
        energy_j: float | None = None,
        energy_estimated: bool = False,
        answer: dict[str, Any] | None = None,
    ) -> TaskView:
        """Settle a task whose attempt committed validly (`prompt_tokens`: what it fixes;
        `answer`: a batch line's, kept with the settlement)."""
        with self.tx() as s:
            t = self._running(s, task_id, attempt, node_id)
            t.state = transition(TaskState(t.state), "finish").value
            self._end_attempt(s, t, "done", new_ids, committed=True)
            if energy_j is not None:
                a = s.get(Attempt, (t.id, t.attempt))
                assert a is not None
                a.energy_j, a.energy_estimated = energy_j, energy_estimated
            t.prompt_tokens = prompt_tokens
            t.finish_reason = finish_reason
            t.answer = answer
            t.updated_at = self.clock()
            shares = self._shares(s, t, prompt_tokens)
            if t.hold:  # nothing was held, so nothing can be owed (see create_task)
                self._post(
                    s,
                    ledger.request_settlement(t.id, _payer(t), t.hold, shares, fee_bps, _cause(t)),
                )
            return _task_view(t)

    def requeue_or_fail(
        self,
        task_id: str,
        attempt: int,
        *,
        new_ids: Sequence[int],
        outcome: str,
        max_attempts: int,
        fee_bps: int,
        committed: bool = False,
    ) -> TaskView:
        """Take a task from a lost, stalled, draining or uncommitted attempt: queue it again,
        or fail it. Its tokens stay delivered, paid only if `committed` (a valid part)."""
        with self.tx() as s:
            t = self._running(s, task_id, attempt, None)
            self._end_attempt(s, t, outcome, new_ids, committed)
            t.node_id = None
            t.updated_at = self.clock()
            if should_retry(t.attempt, max_attempts):
                t.state = transition(TaskState(t.state), "requeue").value
            else:
                t.state = transition(TaskState(t.state), "fail").value
                t.error = f"gave up after {t.attempt} attempts ({outcome})"
                if t.hold:
                    self._post(s, ledger.request_release(t.id, _payer(t), t.hold, _cause(t)))
            return _task_view(t)

    def fail(
        self,
        task_id: str,
        reason: str,
        *,
        charge_delivered: bool = False,
        new_ids: Sequence[int] = (),
        fee_bps: int = 0,
    ) -> TaskView | None:
        """End a task without completion. Unless output was delivered, the hold goes back whole
        (`charge_delivered`: the consumer left, the running attempt is paid uncommitted)."""
        with self.tx() as s:
            t = s.get(Task, task_id, with_for_update=True)
            if t is None or t.state in (TaskState.DONE.value, TaskState.FAILED.value):
                return _task_view(t) if t else None
            running = t.state == TaskState.RUNNING.value
            t.state = transition(TaskState(t.state), "fail").value
            if running:
                self._end_attempt(s, t, reason, new_ids, committed=charge_delivered)
            t.error = reason
            t.updated_at = self.clock()
            t.node_id = None
            payer = _payer(t)
            if not t.hold:
                return _task_view(t)  # nothing held, nothing to settle
            if charge_delivered and t.output_tokens:
                # The consumer left mid-answer: what was delivered was real work.
                entry = ledger.request_settlement(
                    t.id, payer, t.hold, self._shares(s, t, 0), fee_bps, _cause(t)
                )
            else:
                entry = ledger.request_release(t.id, payer, t.hold, _cause(t))
            self._post(s, entry)
            return _task_view(t)

    def batch_settled_tasks(
        self, batch_ids: Sequence[str]
    ) -> dict[tuple[str, str], list[TaskView]]:
        """The settled tasks of these batches' lines (each choice's, from any run of the
        line), by (batch id, custom_id): one scan, for a restart's resume."""
        if not batch_ids:
            return {}
        tag = Task.payload["batch"]
        out: dict[tuple[str, str], list[TaskView]] = {}
        with self.read() as s:
            rows = s.scalars(
                select(Task).where(
                    Task.state == TaskState.DONE.value, tag["id"].as_string().in_(batch_ids)
                )
            )
            for t in rows:
                key = (t.payload["batch"]["id"], t.payload["batch"]["custom_id"])
                out.setdefault(key, []).append(_task_view(t))
        return out

    def running_tasks(self) -> list[TaskView]:
        """Tasks currently held by a provider."""
        with self.tx() as s:
            return [_task_view(t) for t in s.scalars(select(Task).where(Task.state == "running"))]

    def queued_tasks(self) -> list[tuple[str, float, bool]]:
        """Queued tasks: (id, creation time, whether it still has a target node); the columns
        only, since the supervisor reads them every pass and payloads are whole requests."""
        with self.tx() as s:
            q = (
                select(Task.id, Task.created_at, Task.target_node_id.is_not(None))
                .where(Task.state == "queued")
                .order_by(Task.created_at)
            )
            return [
                (task_id, created, bool(targeted)) for task_id, created, targeted in s.execute(q)
            ]

    def untarget(self, task_id: str) -> None:
        """Return a queued task that its target never picked up to the shared queue."""
        with self.tx() as s:
            s.execute(
                update(Task)
                .where(Task.id == task_id, Task.state == "queued")
                .values(target_node_id=None)
            )

    def running_by_node(self) -> dict[str, int]:
        """Tasks each node holds right now."""
        with self.tx() as s:
            rows = s.execute(
                select(Task.node_id, func.count())
                .where(Task.state == TaskState.RUNNING.value)
                .group_by(Task.node_id)
            ).all()
            return {node_id: count for node_id, count in rows if node_id}

    def task_counts(self) -> dict[str, int]:
        """Number of tasks per state."""
        with self.read() as s:
            return dict(s.execute(select(Task.state, func.count()).group_by(Task.state)).all())
