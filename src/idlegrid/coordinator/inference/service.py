"""Inference: submit and stream requests, hand them to providers, take uploads, settle,
and take work back from providers that died or stalled.

Routes call these; these call the pure core for decisions and the store for state. Store
calls are blocking (SQLAlchemy), so they run in worker threads; the hub is touched only
from the event loop, which keeps each task's stream and its attempt bookkeeping in step.
What trust and the market do with a finished answer they do on `AnswerFinished`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.events import AnswerFinished, NodeRegistered
from idlegrid.coordinator.inference.candidates import (
    batch_slots,
    for_batch,
    in_flight,
    live_candidates,
)
from idlegrid.coordinator.inference.choices import derive_seed
from idlegrid.coordinator.inference.hub import HANDOVER_WAIT_S, Event, Hub, TaskStream
from idlegrid.coordinator.inference.pieces import (
    accept_prompt,
    answer_slo,
    bill_prompt,
    budget,
    check_budget,
    check_logprobs,
    committed_logprobs,
    committed_prompt,
    kept_answer,
)
from idlegrid.coordinator.inference.ports import (
    CommitmentChecks,
    NodeDirectory,
    PaidWork,
    RoutingSignals,
    claimable,
    paid_filter,
    paid_ok,
    refusal,
)
from idlegrid.coordinator.inference.reserved import route_request
from idlegrid.coordinator.inference.structured import constrained
from idlegrid.coordinator.inference.supervise import supervise
from idlegrid.coordinator.views import TaskView, new_task_view
from idlegrid.core import ledger, reservations, routing, tasks
from idlegrid.core.ledger import Price
from idlegrid.errors import (
    AuthError,
    Conflict,
    IdlegridError,
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    StaleAttempt,
)

log = logging.getLogger("idlegrid.coordinator")


class RequestFailed(IdlegridError):
    """A request could not be served after every retry; nothing was charged."""

    code = "request_failed"


class Inference:
    """Requests from consumers to providers and back, behind plain async methods."""

    def __init__(
        self,
        ctx: Context,
        nodes: NodeDirectory,
        trust: CommitmentChecks,
        market: RoutingSignals,
        paid: PaidWork | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.store = ctx.store
        self.clock = ctx.clock
        self.metrics, self.changes, self.db = ctx.metrics, ctx.changes, ctx.db
        self.hub = Hub()
        self.nodes, self.trust, self.market = nodes, trust, market
        self.paid, stake = paid, ctx.settings.inference_stake
        self.paid_ok = functools.partial(paid_ok, stake, market, paid, ctx.db)
        # Key id -> its balance after this process's last hold, less holds written since:
        # a lower bound while this process is the only spender (see submit).
        self._balance_hint: dict[str, int] = {}
        # Running tasks whose stream did not match the row at the last supervisor pass.
        self.unmatched_seen: set[tuple[str, int, str | None]] = set()
        # Node id -> when its reservation's owner last had covered work routed or finished
        # there: such a node is not spare capacity for a while (core/reservations.kept).
        self.covered_at: dict[str, float] = {}

    def candidates(
        self, model: str, prompt_tokens: int = 0, max_tokens: int = 1
    ) -> tuple[list[routing.Candidate], dict[str, Price]]:
        """Live providers of `model` with their load (from the hub), prices and reliability."""
        return live_candidates(self, model, prompt_tokens, max_tokens)

    # ---- agents ------------------------------------------------------------------------

    def on_register(self, event: NodeRegistered) -> None:
        """A node (re)registered: it may take queued work at once."""
        self.hub.wake(event.node_id)

    async def poll(self, node_id: str, models: list[str], wait_s: float) -> TaskView | None:
        """Long poll: a claimed task for this node, or None after `wait_s`."""
        if node_id in self.ctx.ejected:
            raise AuthError("this node was ejected after failed audits")
        deadline = self.clock() + min(wait_s, self.settings.long_poll_s)
        event = self.hub.work_event(node_id)
        # A poll is a sign of life; later wake-ups skip this write to keep claims fast.
        await self.nodes.seen(node_id)
        while True:
            # Clear before looking, so a wake-up that races with the claim is not lost.
            event.clear()
            may_paid = node_id in await self.paid_ok([node_id])
            node = self.nodes.cache.get(node_id)
            kept = reservations.kept(
                self.market.reservations,
                self.covered_at,
                self.clock(),
                self.settings.reservation_grace_s,
            )
            # Batch lines fill a node's slots but its headroom (candidates.batch_slots).
            batch_ok = (
                node is None
                or batch_slots(node) >= node.slots
                or in_flight(self).get(node_id, 0) + self.hub.claiming.get(node_id, 0)
                < batch_slots(node)
            )
            # The slot a claim that may take a batch line fills counts as busy until the
            # claim is done (bench_batch: else 9 lines ran on 8 batch slots, the headroom's
            # included, 8.3 on average).
            reserved = int(batch_ok)
            self.hub.claiming[node_id] = self.hub.claiming.get(node_id, 0) + reserved
            try:
                task = await self._claim(
                    node_id, claimable(models, node, may_paid), node_id in kept, batch_ok
                )
                if task is not None:
                    self.hub.begin_attempt(task.id, task.attempt, self.clock(), budget(task))
                    stream = self.hub.get(task.id)
                    if stream is not None:
                        stream.node_id, stream.target = node_id, None
            finally:
                self.hub.claiming[node_id] -= reserved
            if task is not None:
                if stream is None:  # the consumer left while it was queued
                    await self.db(self.store.fail, task.id, "consumer disconnected")
                    continue
                return task
            remaining = deadline - self.clock()
            if remaining <= 0:
                return None
            # Park: a new request routed here is handed over directly (no claim round trip);
            # the event covers work left in the shared queue.
            handed: asyncio.Future[TaskView] = asyncio.get_running_loop().create_future()
            self.hub.park(node_id, handed)
            woken = asyncio.ensure_future(event.wait())
            either: set[asyncio.Future[Any]] = {handed, woken}
            try:
                await asyncio.wait(either, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
                self.hub.unpark(node_id, handed)
                if not handed.done():
                    handed.cancel()
            if not handed.cancelled():
                return handed.result()
            if not event.is_set():
                return None

    async def _claim(
        self, node_id: str, models: list[str], covered_only: bool = False, batch_ok: bool = True
    ) -> TaskView | None:
        """One claim, which outlives a poll cancelled while it runs (the agent hung up):
        the row it wrote would say the node holds a task that never reached it, so the
        task is handed straight back instead."""
        claim = asyncio.ensure_future(
            self.db(self.store.claim, node_id, models, covered_only, batch_ok)
        )
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            claim.add_done_callback(lambda f: self._hand_back_claim(node_id, f))
            raise

    def _hand_back_claim(self, node_id: str, claim: asyncio.Future[TaskView | None]) -> None:
        if claim.cancelled() or claim.exception() is not None or claim.result() is None:
            return
        task = claim.result()
        assert task is not None
        stream = self.hub.get(task.id)
        if stream is None:
            asyncio.ensure_future(self.db(self.store.fail, task.id, "consumer disconnected"))
            return
        self.hub.begin_attempt(task.id, task.attempt, self.clock(), budget(task))
        stream.node_id, stream.target = node_id, None
        asyncio.ensure_future(self._give_up_quietly(node_id, task.id, task.attempt))

    async def _give_up_quietly(self, node_id: str, task_id: str, attempt: int) -> None:
        with contextlib.suppress(Conflict):
            await self.give_up(node_id, task_id, attempt, "hand-over missed")

    def _attempt_stream(self, task_id: str, attempt: int, node_id: str) -> TaskStream:
        stream = self.hub.get(task_id)
        if stream is None or stream.attempt != attempt or stream.node_id != node_id:
            raise StaleAttempt(task_id, attempt)
        return stream

    async def upload(
        self,
        node_id: str,
        task_id: str,
        attempt: int,
        start: int,
        pieces: list[tuple[int, str]],
        logprobs: list[Any] | None = None,
        prompt: Any = None,
    ) -> None:
        """Pieces of output from the provider holding the attempt (and, before them, its
        prompt logprobs when asked for); retries are idempotent."""
        stream = self._attempt_stream(task_id, attempt, node_id)
        async with stream.lock:
            stream = self._attempt_stream(task_id, attempt, node_id)
            if prompt is not None and (shown := accept_prompt(stream, prompt)) is not None:
                self.hub.push(task_id, Event("pieces", pieces=[], data=shown))
                if stream.batch:
                    stream.kept.update(shown)
            if start > stream.next_index:
                raise Conflict(
                    f"upload starts at {start}, expected {stream.next_index}",
                    expected=stream.next_index,
                )
            fresh = pieces[stream.next_index - start :]
            if not fresh:
                return
            check_budget(stream, task_id, fresh)
            lps = check_logprobs(stream, fresh, logprobs, stream.next_index - start)
            if stream.batch:
                stream.kept["text"] += [t for _, t in fresh]
                stream.kept["logprobs"] += lps or []
            stream.next_index += len(fresh)
            stream.attempt_ids.extend(tid for tid, _ in fresh if tid >= 0)
            stream.last_progress = self.clock()
            if stream.first_piece_at is None:
                stream.first_piece_at = stream.last_progress
            self.hub.push(task_id, Event("pieces", pieces=fresh, data={"logprobs": lps}))

    def accepted(self, node_id: str, task_id: str, attempt: int) -> int:
        """How many pieces of the attempt have been accepted (StaleAttempt if not held)."""
        return self._attempt_stream(task_id, attempt, node_id).next_index

    async def finish(
        self,
        node_id: str,
        task_id: str,
        attempt: int,
        prompt_tokens: int,
        finish_reason: str,
        commitment: str | None = None,
        energy_j: float | None = None,
        energy_estimated: bool = False,
    ) -> TaskView:
        """The provider finished: settle (prompt tokens billed from the commitment, the claim
        is advisory) and tell the consumer. Without a valid commitment the attempt is a failed
        answer: unpaid, uncharged, against reliability, handed on (InvalidRequest says so)."""
        stream = self._attempt_stream(task_id, attempt, node_id)
        await stream.created.wait()
        refused: InvalidRequest | None = None
        async with stream.lock:
            stream = self._attempt_stream(task_id, attempt, node_id)
            task = await self.db(self.store.get_task, task_id)
            assert task is not None
            ids = list(stream.attempt_ids)
            try:  # checked before anything settles
                if commitment is None:
                    raise InvalidRequest(
                        "no commitment: the answer cannot be audited",
                        param="commitment",
                    )
                committed = self.trust.check_commitment(task, commitment, ids, finish_reason)
                committed_logprobs(committed, stream.attempt_logprobs)
                committed_prompt(committed, stream, task)
            except InvalidRequest as exc:
                refused = exc
                requeued = await self._end_attempt(stream, task_id, attempt, ids, tasks.UNCOMMITTED)
            else:
                billed = bill_prompt(task, committed, prompt_tokens, node_id)
                done = await self.db(
                    self.store.finish,
                    task_id,
                    attempt,
                    node_id,
                    new_ids=ids,
                    prompt_tokens=billed,
                    finish_reason=finish_reason,
                    fee_bps=self.settings.fee_bps,
                    energy_j=energy_j,
                    energy_estimated=energy_estimated,
                    answer=kept_answer(stream, committed) if stream.batch else None,
                )
                stream.attempt = -1
                if task.payload.get("reservation"):
                    self.covered_at[node_id] = self.clock()
                # The commitment rides along: an embeddings answer is its vectors.
                self.hub.push(task_id, Event("done", data={"task": done, "commitment": committed}))
                self.changes.bump()
        if refused is not None:
            log.warning("task %s: attempt %d on %s unpaid: %s", task_id, attempt, node_id, refused)
            self._moved_on(requeued, stream, tasks.UNCOMMITTED)
            raise InvalidRequest(
                f"{refused.message}; this attempt is not paid and the request "
                + ("goes to another provider" if requeued.state == "queued" else "failed"),
                param="commitment",
            )
        ttft, tps = answer_slo(stream, self.clock())
        await self.ctx.events.emit(
            AnswerFinished(
                done, node_id, attempt, committed, task.delivered_ids, ttft_s=ttft, tps=tps
            )
        )
        return done

    async def give_up(
        self,
        node_id: str | None,
        task_id: str,
        attempt: int,
        outcome: str,
        invalid: str | None = None,
        commitment: str | None = None,
        invalid_param: str = "prompt",
    ) -> None:
        """Take an attempt away (provider lost, stalled, draining, or failed it).

        `invalid` is set when the provider found the request itself bad (e.g. longer than
        the context): that fails for every provider, so it ends the task instead of a retry.
        Delivered tokens are paid only under a valid part `commitment` (a dead provider's are
        not)."""
        stream = self.hub.get(task_id)
        if stream is None:
            await self.db(self.store.fail, task_id, outcome)
            return
        if node_id is not None:
            stream = self._attempt_stream(task_id, attempt, node_id)
        await stream.created.wait()
        async with stream.lock:
            if stream.attempt != attempt:
                raise StaleAttempt(task_id, attempt)
            ids = list(stream.attempt_ids)
            part = None
            if commitment is not None and node_id is not None and ids:
                # Checked before anything moves: a bad one is a 400 and the attempt stays.
                before = await self.db(self.store.get_task, task_id)
                assert before is not None
                part = (self.trust.check_part(before, commitment, ids), before.delivered_ids)
            if invalid is not None:
                stream.attempt = -1  # uploads for this attempt are refused from here on
                self.metrics.failovers.labels(outcome).inc()
                await self.db(
                    self.store.fail, task_id, invalid, charge_delivered=False, new_ids=ids
                )
                self.hub.push(
                    task_id, Event("failed", data={"invalid": invalid, "param": invalid_param})
                )
                self.changes.bump()
                return
            task = await self._end_attempt(
                stream, task_id, attempt, ids, outcome, committed=part is not None
            )
        if part is not None and node_id is not None:
            # Its part is committed and final now: the beacon may select it for audit.
            await self.ctx.events.emit(
                AnswerFinished(task, node_id, attempt, part[0], part[1], part=True)
            )
        self._moved_on(task, stream, outcome)

    async def _end_attempt(
        self,
        stream: TaskStream,
        task_id: str,
        attempt: int,
        ids: list[int],
        outcome: str,
        committed: bool = False,
    ) -> TaskView:
        """End a held attempt (under the stream's lock): queue the task again or fail it."""
        stream.attempt = -1  # uploads for this attempt are refused from here on
        self.metrics.failovers.labels(outcome).inc()
        task = await self.db(
            self.store.requeue_or_fail,
            task_id,
            attempt,
            new_ids=ids,
            outcome=outcome,
            max_attempts=self.settings.max_attempts,
            fee_bps=self.settings.fee_bps,
            committed=committed,
        )
        self.changes.bump()
        return task

    def _moved_on(self, task: TaskView, stream: TaskStream, outcome: str) -> None:
        """After an attempt ended: wake the next provider, or tell the consumer it failed."""
        if task.state == "queued":
            log.warning("task %s: attempt %d %s; handing it on", task.id, task.attempt, outcome)
            if task.payload.get("reservation"):  # only its reserved providers may claim it
                self.hub.wake(None)
            else:
                self._wake_for(task.model_id, exclude=frozenset({stream.node_id or ""}))
        else:
            self.hub.push(task.id, Event("failed", data={"error": task.error}))

    # ---- consumers ---------------------------------------------------------------------

    async def models(self) -> list[dict[str, Any]]:
        """Models that some live provider serves now."""
        live = await self.db(self.store.live_nodes, self.settings.node_timeout_s)
        seen: dict[str, int] = {}
        for n in live:
            for model_id in n.offers:
                seen.setdefault(model_id, int(n.last_seen))
        return [
            {"id": m, "object": "model", "created": t, "owned_by": "idlegrid"}
            for m, t in sorted(seen.items())
        ]

    async def submit(
        self,
        key_id: str,
        model: str,
        kind: str,
        payload: dict[str, Any],
        max_prompt_tokens: int,
        max_tokens: int,
        price_cap: Price | None = None,
        reserve: Sequence[tuple[int, int]] = (),
        batch: dict[str, Any] | None = None,
    ) -> tuple[str, TaskStream]:
        """Validate, escrow and queue a request; the returned stream yields its events.

        `reserve`: (prompt-token bound, max tokens) of each sibling choice still to be
        submitted; the escrow is refused unless the balance also covers them. `batch`: a
        batch line's tag (`id`, `custom_id`, `payer`, `share_bps`): batch prices, paid from
        the batch's escrow, claimed after interactive work (docs/batch.md)."""
        low = 0 if payload.get("prompt_logprobs") is not None else 1  # 0: scoring a prompt
        if max_tokens < low or max_tokens > self.settings.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens must be between {low} and {self.settings.max_tokens_limit}",
                param="max_tokens",
            )
        cands, prices = self.candidates(model, max_prompt_tokens, max_tokens)
        if batch is not None:
            cands, prices = for_batch(self, cands, prices, batch.get("share_bps"))
        if not cands:
            if model not in await self.db(self.store.known_models):
                raise ModelNotFound(model)
            raise NoCapacity(model, "no live provider serves it")
        if payload.get("grammar"):  # structured outputs: only engines that can constrain
            cands, prices = constrained(model, self.nodes.cache, cands, prices)
        offered = set(prices)
        cands, prices = await paid_filter(self.paid_ok, cands, prices)
        if not cands:
            budget = self.paid.budget_ucr if self.paid is not None else -1
            stake = self.settings.inference_stake
            raise NoCapacity(model, refusal(stake, self.market, budget, offered))
        route = route_request(self, key_id, model, cands, prices, price_cap, batch is not None)
        basis, prices, target = route.basis, route.prices, route.target
        hold = ledger.hold_amount(max_prompt_tokens, max_tokens, basis)
        keep = sum(ledger.hold_amount(b, m, basis) for b, m in reserve)
        prefix = {"chat": "chatcmpl-", "embedding": "embd-"}.get(kind, "cmpl-")
        task_id = prefix + secrets.token_hex(12)
        payload = {
            **payload,
            "max_tokens": max_tokens,
            "max_prompt_tokens": max_prompt_tokens,
            "price_cap": [basis.prompt, basis.output],
            **({"batch": batch} if batch is not None else {}),
            **({"reservation": route.reservation} if route.reservation else {}),
        }
        if payload.get("seed") is None:
            payload["seed"] = derive_seed(task_id)
        self.hub.note_routed(target.node_id if target else None)
        stream = self.hub.open(task_id, self.clock())
        stream.target = target.node_id if target else None
        stream.route = route.reason
        stream.budget, stream.logprobs_k = max_tokens, payload.get("logprobs")
        stream.prompt_k, stream.batch = payload.get("prompt_logprobs"), batch is not None
        parked = self.hub.take_parked(target.node_id) if target else None
        if parked is None and target and batch is None:
            if target.has_free_slot:  # its poll is between two claims
                parked = await self.hub.wait_parked(target.node_id, HANDOVER_WAIT_S)
            else:  # busy: a batch line there yields its slot
                await self.hub.make_room(target.node_id)
        claim_for = (target.node_id, prices[target.node_id]) if parked and target else None
        hint = -1 if batch is not None else self._balance_hint.get(key_id, -1)
        early = claim_for is not None and hint >= hold + keep
        if early:
            # The key's balance covered this hold when last seen, and nothing here has
            # spent it since: hand the task over now and write its escrow meanwhile, which
            # takes the write off the path to the first token. The write is still the
            # guard; if it fails, the attempt is taken back before any output is accepted.
            self._balance_hint[key_id] -= hold
            assert parked is not None and claim_for is not None
            stream.attempt, stream.node_id, stream.target = 1, claim_for[0], None
            parked.set_result(
                new_task_view(task_id, key_id, model, kind, payload, hold, claim_for[0])
            )
        try:
            _, balance = await self.db(
                self.store.create_task,
                task_id=task_id,
                key_id=key_id,
                model_id=model,
                kind=kind,
                payload=payload,
                hold=hold,
                target_node_id=target.node_id if target else None,
                claim_for=claim_for,
                keep=keep,
                priority=int(batch is not None),
            )
        except BaseException:
            self._balance_hint.pop(key_id, None)
            stream.attempt = -1  # an early hand-over's uploads and reports are refused
            stream.created.set()
            self.hub.close(task_id)
            if parked is not None and not parked.done():
                parked.cancel()  # the poll goes back to waiting on its event
            raise
        if batch is None:  # a batch line's balance is its batch's escrow
            self._balance_hint[key_id] = balance
        stream.created.set()
        self.changes.bump()
        if early:
            return task_id, stream
        if parked is None or target is None:
            self.hub.wake(target.node_id if target else None)
        else:
            stream.attempt, stream.node_id, stream.target = 1, target.node_id, None
            if parked.done():  # the poll ended while the escrow was written
                await self.give_up(None, task_id, 1, "hand-over missed")
            else:
                parked.set_result(
                    new_task_view(task_id, key_id, model, kind, payload, hold, target.node_id)
                )
        return task_id, stream

    def _wake_for(self, model: str, exclude: frozenset[str]) -> None:
        """Wake the provider a requeued task should go to (or every one, if all are busy)."""
        cands, _ = self.candidates(model)
        target = routing.choose(cands, exclude) or routing.choose(cands)
        if target is None:
            self.hub.wake(None)
        else:
            self.hub.wake(target.node_id)

    async def events(self, stream: TaskStream) -> AsyncIterator[Event]:
        """Events of a request until it is done or failed."""
        while True:
            event = await stream.queue.get()
            yield event
            if event.kind in ("done", "failed"):
                return

    async def abandon(self, task_id: str) -> None:
        """The consumer left: stop the work, charge only what was delivered."""
        stream = self.hub.get(task_id)
        self.hub.close(task_id)
        ids = list(stream.attempt_ids) if stream and stream.attempt > 0 else []
        await self.db(
            self.store.fail,
            task_id,
            "consumer disconnected",
            charge_delivered=True,
            new_ids=ids,
            fee_bps=self.settings.fee_bps,
        )
        self.changes.bump()

    # ---- supervision -------------------------------------------------------------------

    async def tick(self, live: frozenset[str]) -> None:
        """Take work from dead or stalled providers; fail requests nobody picked up in time
        (inference/supervise.py)."""
        await supervise(self, live)
