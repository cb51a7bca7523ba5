"""Batches: create (validate the input file, escrow the worst case), read, list, cancel;
and run them (the tick starts a runner per batch in progress, ends expired and cancelled
ones, writes the output files and refunds what the escrow still holds).

State lives in the database (`batches`, `batch_lines`): a restarted coordinator resumes
every batch in progress; the lines that were running when it stopped run again (their
tasks were failed and released by the inference supervisor, which has no stream for them).

What this domain needs of others it is handed by `app.compose()`: the caller's files
(`FileAccess`) and the gateway's judge and runner of lines (`LineRunner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO, Protocol, cast

from sqlalchemy import and_, func, or_, select, update

from idlegrid.coordinator.batches.tables import Batch, BatchLine
from idlegrid.coordinator.context import Context
from idlegrid.coordinator.db.tables import Account
from idlegrid.coordinator.http_errors import error_body, status_for
from idlegrid.coordinator.views import TaskView
from idlegrid.core import ledger
from idlegrid.core.batch import results
from idlegrid.core.batch.counts import RequestCounts
from idlegrid.core.batch.input import check_endpoint, check_input, numbered
from idlegrid.core.batch.lifecycle import BATCH, STAMPS, BatchState, cancel
from idlegrid.core.batch.money import batch_escrow, batch_refund, escrow_account
from idlegrid.core.ledger import Price
from idlegrid.errors import IdlegridError, InvalidRequest, NoCapacity, NotFound

log = logging.getLogger("idlegrid.batches")
MAX_LIST = 100  # OpenAI's bound for `limit`
RETRY_S = 1.0  # a line no provider could take now waits this long before it is tried again


class FileAccess(Protocol):
    """The files domain, as batches use it (blocking calls)."""

    def get(self, key_id: str, file_id: str) -> dict[str, Any]: ...

    def open(self, key_id: str, file_id: str) -> Iterator[bytes]: ...

    def save(
        self, key_id: str, filename: str, purpose: str, src: BinaryIO, *, system: bool = False
    ) -> dict[str, Any]: ...


class Quote(Protocol):
    """A line's escrowed worst case and the batch price it was quoted at."""

    @property
    def hold(self) -> int: ...

    @property
    def price(self) -> Price: ...


class Outcome(Protocol):
    """A line's answer: the endpoint's status and body, and the grid request behind it."""

    @property
    def status(self) -> int: ...

    @property
    def body(self) -> dict[str, Any]: ...

    @property
    def request_id(self) -> str: ...


class LineRunner(Protocol):
    """The gateway, as batches use it (inference/lines.py)."""

    async def quote(self, url: str, body: dict[str, Any]) -> Quote: ...

    async def run(
        self,
        key_id: str,
        url: str,
        body: dict[str, Any],
        tag: dict[str, Any],
        cap: Price,
        settled: Sequence[TaskView] = (),
    ) -> Outcome: ...

    def rebuild(
        self, url: str, body: dict[str, Any], settled: list[TaskView]
    ) -> Outcome | None: ...


def _missing(batch_id: str) -> NotFound:
    return NotFound(f"No such Batch object: {batch_id}", param="batch_id")


def view(b: Batch, waiting: tuple[str, float] | None = None) -> dict[str, Any]:
    """OpenAI's Batch object (and, while its lines wait for capacity, why)."""

    def stamp(t: float | None) -> int | None:
        return None if t is None else int(t)

    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": b.errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": int(b.created_at),
        "in_progress_at": stamp(b.in_progress_at),
        "expires_at": stamp(b.expires_at),
        "finalizing_at": stamp(b.finalizing_at),
        "completed_at": stamp(b.completed_at),
        "failed_at": stamp(b.failed_at),
        "expired_at": stamp(b.expired_at),
        "cancelling_at": stamp(b.cancelling_at),
        "cancelled_at": stamp(b.cancelled_at),
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.meta,
        "waiting": {"reason": waiting[0], "since": int(waiting[1])} if waiting else None,
    }


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The physical lines of a file read in chunks (one line held at a time)."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        yield from whole
    if rest:
        yield rest


def _move(b: Batch, state: str, now: float) -> None:
    b.status = BATCH.move(b.status, state, key=b.id)
    setattr(b, STAMPS[state], now)


class Batches:
    """The Batch API over the grid."""

    def __init__(self, ctx: Context, files: FileAccess, lines: LineRunner) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.files = files
        self.lines = lines
        self.in_flight = asyncio.Semaphore(ctx.settings.batch_in_flight)
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._resumed = False
        # (batch id, line) -> the tasks a restart found settled for a line it had cut short:
        # when the line runs again, only its other choices run (nothing charged twice).
        self._settled: dict[tuple[str, int], list[TaskView]] = {}
        # Batch id -> (why its lines find no provider now, since when); live, not stored.
        self.waiting: dict[str, tuple[str, float]] = {}

    # ---- create ------------------------------------------------------------------------

    async def create(
        self,
        key_id: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Validate the input file, judge and price every line, escrow the whole batch's
        worst case (402 if the balance cannot), and queue it; the Batch object."""
        try:
            check_endpoint(endpoint)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="endpoint") from None
        try:
            window_s = results.window_seconds(completion_window, self.ctx.settings.batch_windows)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="completion_window") from None
        file = await self.ctx.db(self.files.get, key_id, input_file_id)
        if file["purpose"] != "batch":
            raise InvalidRequest(
                f"file {input_file_id} has purpose {file['purpose']!r}, not 'batch'",
                param="input_file_id",
            )
        chunks = await self.ctx.db(self.files.open, key_id, input_file_id)
        checked = await self.ctx.db(lambda: check_input(numbered(_lines(chunks)), endpoint))
        now = self.ctx.clock()
        batch_id = "batch_" + secrets.token_hex(12)
        row: dict[str, Any] = {
            "id": batch_id,
            "key_id": key_id,
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": BATCH.begin(BatchState.VALIDATING, key=batch_id),
            "created_at": now,
            "expires_at": now + window_s,
            "meta": metadata,
            "total": len(checked.lines),
            "completed": 0,
            "failed": 0,
            "escrow": 0,
        }
        if not checked.ok:  # OpenAI's failed batch: its errors name the lines, nothing runs
            row |= {"errors": checked.errors_object(), "total": 0}
            failed = Batch(**row)
            _move(failed, BatchState.FAILED.value, now)
            return await self.ctx.db(self._insert, failed, [])
        lines: list[BatchLine] = []
        for line in checked.lines:
            entry = BatchLine(
                batch_id=batch_id, line=line.line, custom_id=line.custom_id, body=line.body
            )
            try:
                quote = await self.lines.quote(line.url, line.body)
            except IdlegridError as exc:  # the line's error-file entry, as the 4xx says
                status, error = _refusal(exc)
                entry.hold, entry.prompt_price, entry.output_price = 0, 0, 0
                entry.state = "failed"
                entry.result = results.refused(
                    _line_id(), line.custom_id, f"req_{secrets.token_hex(12)}", status, error
                )
                row["failed"] += 1
            else:
                entry.hold, entry.state = quote.hold, "pending"
                entry.prompt_price, entry.output_price = quote.price.prompt, quote.price.output
                row["escrow"] += quote.hold
            lines.append(entry)
        batch = Batch(**row)
        _move(batch, BatchState.IN_PROGRESS.value, now)
        return await self.ctx.db(self._insert, batch, lines)

    def _insert(self, b: Batch, lines: list[BatchLine]) -> dict[str, Any]:
        with self.store.tx() as s:
            s.add(b)
            s.flush()
            s.add_all(lines)
            if b.escrow:  # InsufficientCredits (402) rolls the batch back: nothing left
                consumer = ledger.consumer_account(b.key_id)
                self.store._post(s, batch_escrow(b.id, consumer, b.escrow))
            return view(b, self.waiting.get(b.id))

    # ---- read, list, cancel ------------------------------------------------------------

    def _get(self, key_id: str, batch_id: str) -> dict[str, Any]:
        with self.store.read() as s:
            b = s.get(Batch, batch_id)
            if b is None or b.key_id != key_id:
                raise _missing(batch_id)
            return view(b, self.waiting.get(b.id))

    async def retrieve(self, key_id: str, batch_id: str) -> dict[str, Any]:
        """The caller's batch, or 404 (another key's batch is no batch)."""
        return await self.ctx.db(self._get, key_id, batch_id)

    def _page(self, key_id: str, after: str | None, limit: int) -> dict[str, Any]:
        if not 1 <= limit <= MAX_LIST:
            raise InvalidRequest(f"limit: must be 1 to {MAX_LIST}", param="limit")
        q = select(Batch).where(Batch.key_id == key_id)
        with self.store.read() as s:
            if after is not None:
                cursor = s.get(Batch, after)
                if cursor is None or cursor.key_id != key_id:
                    raise InvalidRequest(f"after: no such batch: {after}", param="after")
                t, i = cursor.created_at, cursor.id
                q = q.where(or_(Batch.created_at < t, and_(Batch.created_at == t, Batch.id < i)))
            q = q.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
            rows = s.scalars(q).all()
            data = [view(b, self.waiting.get(b.id)) for b in rows[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(rows) > limit,
        }

    async def listing(self, key_id: str, after: str | None, limit: int) -> dict[str, Any]:
        """The caller's batches, newest first (OpenAI's cursor list)."""
        return await self.ctx.db(self._page, key_id, after, limit)

    def _cancel(self, key_id: str, batch_id: str) -> dict[str, Any]:
        with self.store.tx() as s:
            b = s.get(Batch, batch_id, with_for_update=True)
            if b is None or b.key_id != key_id:
                raise _missing(batch_id)
            b.status = cancel(b.status, key=batch_id)  # 409 once it is finalizing or ended
            b.cancelling_at = self.ctx.clock()
            return view(b, self.waiting.get(b.id))

    async def cancel(self, key_id: str, batch_id: str) -> dict[str, Any]:
        """Cancel: `cancelling` now; the tick stops its lines, refunds the undone ones and
        ends it `cancelled`."""
        out = await self.ctx.db(self._cancel, key_id, batch_id)
        self.ctx.changes.bump()
        return out

    # ---- running -----------------------------------------------------------------------

    async def tick(self, live: frozenset[str]) -> None:
        """Start a runner per batch in progress, end expired and cancelled batches, and
        finalize those whose every line has ended."""
        if not self._resumed:
            await self.ctx.db(self._resume)
            self._resumed = True
            self.ctx.changes.bump()
        now = self.ctx.clock()
        for b in await self.ctx.db(self._active):
            runner = self._runners.get(b.id)
            window_s = b.expires_at - b.created_at
            if b.status == BatchState.CANCELLING or (
                b.status == BatchState.IN_PROGRESS and results.expired(b.created_at, window_s, now)
            ):
                await self._stop_runner(b.id)
                end = BatchState.CANCELLED if b.status == BatchState.CANCELLING else "expired"
                await self.ctx.db(self._end, b.id, str(end))
            elif b.status == BatchState.FINALIZING:
                await self.ctx.db(self._end, b.id, BatchState.COMPLETED.value)
            elif runner is None or runner.done():
                left = await self.ctx.db(self._left, b.id)
                if left["pending"]:
                    self._runners[b.id] = asyncio.ensure_future(
                        self._drive(b.id, b.key_id, b.endpoint)
                    )
                elif not left["running"]:
                    await self.ctx.db(self._finalizing, b.id)
                    await self.ctx.db(self._end, b.id, BatchState.COMPLETED.value)

    async def stop(self) -> None:
        """Stop every runner (the coordinator is shutting down; the batches resume)."""
        for batch_id in list(self._runners):
            await self._stop_runner(batch_id)

    async def _stop_runner(self, batch_id: str) -> None:
        runner = self._runners.pop(batch_id, None)
        if runner is not None and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    def _resume(self) -> None:
        """Lines cut short by a stopped coordinator: a line whose every choice settled
        (charged) is rebuilt from the answers its tasks kept; the rest run again, only
        their unsettled choices (unsettled tasks were failed uncharged by the inference
        supervisor). Pending lines with settled choices are among them: a restart before
        a cut-short line ran again leaves it pending."""
        live = [b.id for b in self._active()]
        settled = self.store.batch_settled_tasks(live)
        with self.store.tx() as s:
            rows = s.execute(
                select(BatchLine, Batch.endpoint)
                .join(Batch, Batch.id == BatchLine.batch_id)
                .where(BatchLine.batch_id.in_(live), BatchLine.state.in_(("running", "pending")))
            ).all()
            lines = [
                (ln.batch_id, ln.line, ln.custom_id, dict(ln.body), url, ln.state)
                for ln, url in rows
                if ln.state == "running" or (ln.batch_id, ln.custom_id) in settled
            ]
        for batch_id, n, custom_id, body, url, state in lines:
            done = settled.get((batch_id, custom_id), [])
            out = self.lines.rebuild(url, body, done)
            if out is None:
                if done:
                    self._settled[(batch_id, n)] = done
                if state == "running":
                    with self.store.tx() as s:
                        s.execute(
                            update(BatchLine)
                            .where(BatchLine.batch_id == batch_id, BatchLine.line == n)
                            .values(state="pending", task_id=None)
                        )
                continue
            log.info("batch %s line %s: settled before a restart, rebuilt", batch_id, custom_id)
            result = results.answered(_line_id(), custom_id, out.request_id, out.body)
            self._done(batch_id, n, result, True, out.request_id)

    def _active(self) -> list[Batch]:
        live = ("in_progress", "cancelling", "finalizing")
        with self.store.read() as s:
            return list(s.scalars(select(Batch).where(Batch.status.in_(live))).all())

    def _left(self, batch_id: str) -> dict[str, int]:
        with self.store.read() as s:
            rows = s.execute(
                select(BatchLine.state, func.count())
                .where(BatchLine.batch_id == batch_id)
                .group_by(BatchLine.state)
            ).all()
        counts = {state: n for state, n in rows}
        return {"pending": counts.get("pending", 0), "running": counts.get("running", 0)}

    async def _drive(self, batch_id: str, key_id: str, url: str) -> None:
        """Feed the batch's pending lines to the grid, at most `batch_in_flight` of every
        batch at once; returns once none is pending (the tick finalizes)."""
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await self.in_flight.acquire()
                line = await self.ctx.db(self._take, batch_id)
                if line is None:
                    self.in_flight.release()
                    break
                task = asyncio.ensure_future(self._one(batch_id, key_id, url, line))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        except Exception:
            log.exception("batch %s: runner failed", batch_id)
            raise
        finally:
            for task in list(running):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*running, return_exceptions=True)

    def _take(self, batch_id: str) -> BatchLine | None:
        with self.store.tx() as s:
            line = s.scalars(
                select(BatchLine)
                .where(BatchLine.batch_id == batch_id, BatchLine.state == "pending")
                .order_by(BatchLine.line)
                .limit(1)
            ).first()
            if line is not None:
                line.state = "running"
            return line

    async def _one(self, batch_id: str, key_id: str, url: str, line: BatchLine) -> None:
        try:
            tag = {"id": batch_id, "custom_id": line.custom_id, "payer": escrow_account(batch_id)}
            cap = Price(line.prompt_price, line.output_price)
            try:
                settled = self._settled.get((batch_id, line.line), [])
                out = await self.lines.run(key_id, url, line.body, tag, cap, settled)
            except NoCapacity as exc:  # no provider now: the line waits, not the error file
                self.waiting.setdefault(batch_id, (exc.message, self.ctx.clock()))
                await asyncio.sleep(RETRY_S)
                await self.ctx.db(self._requeue, batch_id, line.line)
                return
            except IdlegridError as exc:
                status, error = _refusal(exc)
                result = results.refused(_line_id(), line.custom_id, "", status, error)
                await self.ctx.db(self._done, batch_id, line.line, result, False, None)
                return
            except Exception:
                # A bug, not the line's fault: it goes back to pending (tried again) rather
                # than staying "running" for ever with nobody running it.
                log.exception("batch %s line %s: unexpected error", batch_id, line.custom_id)
                await asyncio.sleep(RETRY_S)
                await self.ctx.db(self._requeue, batch_id, line.line)
                return
            self.waiting.pop(batch_id, None)
            self._settled.pop((batch_id, line.line), None)
            if out.status == 200:
                result = results.answered(_line_id(), line.custom_id, out.request_id, out.body)
            else:
                result = results.refused(
                    _line_id(), line.custom_id, out.request_id, out.status, out.body["error"]
                )
            await self.ctx.db(
                self._done, batch_id, line.line, result, out.status == 200, out.request_id
            )
        finally:
            self.in_flight.release()

    def _requeue(self, batch_id: str, n: int) -> None:
        with self.store.tx() as s:
            s.execute(
                update(BatchLine)
                .where(
                    BatchLine.batch_id == batch_id,
                    BatchLine.line == n,
                    BatchLine.state == "running",
                )
                .values(state="pending")
            )

    def _done(
        self,
        batch_id: str,
        n: int,
        result: dict[str, Any],
        ok: bool,
        task_id: str | None,
    ) -> None:
        with self.store.tx() as s:
            res = s.execute(
                update(BatchLine)
                .where(
                    BatchLine.batch_id == batch_id,
                    BatchLine.line == n,
                    BatchLine.state == "running",
                )
                .values(state="done" if ok else "failed", result=result, task_id=task_id)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return  # the batch ended meanwhile: the line was counted unfinished
            b = s.get(Batch, batch_id, with_for_update=True)
            assert b is not None
            counts = RequestCounts(b.total, b.completed, b.failed).record(ok)
            b.completed, b.failed = counts.completed, counts.failed
        self.ctx.changes.bump()

    def _finalizing(self, batch_id: str) -> None:
        with self.store.tx() as s:
            b = s.get(Batch, batch_id, with_for_update=True)
            assert b is not None
            _move(b, BatchState.FINALIZING.value, self.ctx.clock())

    def _end(self, batch_id: str, state: str) -> None:
        """End a batch in `state`: unfinished lines to the error file (uncharged), the
        output and error files written, the escrow's rest refunded, in that order."""
        self.waiting.pop(batch_id, None)
        with self.store.tx() as s:
            b = s.get(Batch, batch_id, with_for_update=True)
            assert b is not None
            left = s.scalars(
                select(BatchLine).where(
                    BatchLine.batch_id == batch_id, BatchLine.state.in_(("pending", "running"))
                )
            ).all()
            for line in left:
                line.state = "failed"
                line.result = results.unfinished(_line_id(), line.custom_id, state)
            if left:
                counts = RequestCounts(b.total, b.completed, b.failed).close()
                b.completed, b.failed = counts.completed, counts.failed
        output, errors = self._write_files(batch_id, b.key_id)
        with self.store.tx() as s:
            b = s.get(Batch, batch_id, with_for_update=True)
            assert b is not None
            b.output_file_id, b.error_file_id = output, errors
            _move(b, state, self.ctx.clock())
            rest = s.scalar(select(Account.balance).where(Account.id == escrow_account(batch_id)))
            if rest:
                consumer = ledger.consumer_account(b.key_id)
                self.store._post(s, batch_refund(batch_id, consumer, int(rest), state))
        self.ctx.changes.bump()

    def _write_files(self, batch_id: str, key_id: str) -> tuple[str | None, str | None]:
        with (
            tempfile.SpooledTemporaryFile(1 << 20) as out,
            tempfile.SpooledTemporaryFile(1 << 20) as err,
        ):
            with self.store.read() as s:
                q = (
                    select(BatchLine.result, BatchLine.state)
                    .where(BatchLine.batch_id == batch_id)
                    .order_by(BatchLine.line)
                )
                for result, state in s.execute(q):
                    dst = out if state == "done" else err
                    dst.write(json.dumps(result, separators=(",", ":")).encode() + b"\n")
            ids: list[str | None] = []
            for f, name in ((out, "output"), (err, "error")):
                if not f.tell():
                    ids.append(None)
                    continue
                f.seek(0)
                src = cast(BinaryIO, f)
                saved = self.files.save(
                    key_id, f"{batch_id}_{name}.jsonl", "batch_output", src, system=True
                )
                ids.append(saved["id"])
        return ids[0], ids[1]


def _line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def _refusal(exc: IdlegridError) -> tuple[int, dict[str, Any]]:
    status, type_ = status_for(exc)
    param = exc.data.get("param") if isinstance(exc.data.get("param"), str) else None
    return status, error_body(exc.message, type_, exc.code, param)["error"]
