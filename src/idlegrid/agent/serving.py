"""Serving inference on the agent: one slot per engine long-polls for tasks (over the agent
channel while it is up, else HTTP) and serves them.

One engine per slot (engines are not thread-safe). Generation runs in a worker thread and
hands pieces to an uploader coroutine through a queue, so the engine never waits on the
network: whatever piled up while one upload was in flight goes in the next.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from idlegrid import tracing
from idlegrid.agent.channel import CHANNEL_PATH, Channel, ChannelClosed, Uploads
from idlegrid.agent.context import AgentContext
from idlegrid.agent.logprob_msgs import logprob_msg, prompt_msg, score_prompt
from idlegrid.agent.node_client import CoordinatorError
from idlegrid.core.energy import Attribution
from idlegrid.core.grammar import GrammarSpec
from idlegrid.engines.base import Engine, Generation, SamplingParams, render_chat, stream_pieces
from idlegrid.engines.embedder import is_embedder
from idlegrid.errors import AuthError, Conflict, EngineError, IdlegridError, InvalidRequest
from idlegrid.protocol.messages import TaskMsg

log = logging.getLogger("idlegrid.agent")

_DONE = object()
_PROMPT = object()  # the prompt's logprobs are ready (job.prompt): they go before any piece


def _constraint(task: TaskMsg) -> Any:
    """What a constrained answer commits to: its grammar's digest and the grammar engine."""
    if not task.grammar:
        return None
    from idlegrid.core.trust.commitment import Constraint
    from idlegrid.engines.grammar import engine_id

    return Constraint(GrammarSpec.from_wire(task.grammar).digest(), engine_id() or "")


@dataclass(eq=False)  # identity semantics: jobs live in a set
class _Job:
    task: TaskMsg
    cancel: threading.Event = field(default_factory=threading.Event)
    delivered: int = 0  # token ids the coordinator accepted for this attempt
    recorder: Any = None  # what the engine recorded, for a part's commitment at handback
    # Per piece (by index in the attempt) its logprobs message, when the request asked.
    logprobs: list[Any] = field(default_factory=list)
    prompt: dict[str, Any] | None = None  # echo with logprobs: PromptLogprobsMsg's fields
    yielded: bool = False  # stopped to make room for interactive work (a batch line)
    generating: bool = False  # the engine is still producing this attempt's tokens


class Serving:
    """The serving slots, the agent channel they use, and the attempts they hold."""

    def __init__(self, ctx: AgentContext, register: Callable[[], Awaitable[None]]) -> None:
        self.ctx = ctx
        # A slot the coordinator refuses registers the agent again.
        self._register = register
        self.jobs: set[_Job] = set()
        self.served = 0
        self.energy = Attribution()
        self.channel: Channel | None = None
        # Called with each new channel before it connects (the lease host hooks in here).
        self.on_channel: Callable[[Channel], None] = lambda channel: None
        # A generation thread for every slot: the default executor has min(32, cores + 4)
        # workers, and with more slots than that (continuous batching: `--parallel 8` on 2
        # cores) the extra requests waited for a whole answer before they even started.
        self.engine_threads = ThreadPoolExecutor(len(ctx.engines), thread_name_prefix="engine")

    async def connect_channel(self) -> bool:
        """Open the agent channel (False if it cannot be had; HTTP is used meanwhile)."""
        url = self.ctx.client.ws_url(CHANNEL_PATH)
        if not self.ctx.config.channel or url is None:
            return False
        channel = Channel(self.ctx.client)
        channel.on_orphan = lambda task: asyncio.create_task(self._hand_back(task))
        channel.on_yield = self._yield
        self.on_channel(channel)
        try:
            await channel.connect(url)
        except Exception as exc:  # refused handshake, no such route (older coordinator)
            log.info("agent channel unavailable (%s); using HTTP", exc)
            return False
        log.info("agent channel open: %s", url)
        self.channel = channel
        return True

    def _yield(self, task_id: str, attempt: int) -> None:
        """Stop an attempt the coordinator wants room from; it is handed back with a part
        commitment, and continues later from the tokens delivered (docs/batch.md)."""
        for job in self.jobs:
            # A finished answer is finished rather than handed back.
            if job.task.task_id == task_id and job.task.attempt == attempt and job.generating:
                job.yielded = True
                job.cancel.set()

    async def keep_channel(self) -> None:
        """Hold the agent channel open, reconnecting after a loss; slots use HTTP meanwhile."""
        if not self.ctx.config.channel or self.ctx.client.ws_url(CHANNEL_PATH) is None:
            return
        delay = 1.0
        while not self.ctx.draining.is_set():
            if self.channel is not None and self.channel.open:
                delay = 1.0
                await self.channel.closed.wait()
            elif not await self.connect_channel():
                delay = min(2 * delay, 30.0)
            await asyncio.sleep(delay)

    async def _hand_back(self, task: dict[str, Any]) -> None:
        """Return a task that reached a slot after it stopped waiting (draining)."""
        with contextlib.suppress(httpx.HTTPError, IdlegridError):
            await self.ctx.client.call(
                f"/api/v1/tasks/{task['task_id']}/attempts/{task['attempt']}/fail",
                {"reason": "provider draining", "kind": "handback"},
            )

    async def slot(self, engine: Engine, index: int = 0) -> None:
        """Poll for tasks and serve them on `engine` until the agent drains."""
        refusals = 0
        while not self.ctx.draining.is_set():
            channel = self.channel if self.channel is not None and self.channel.open else None
            try:
                if channel is not None:
                    poll = asyncio.create_task(
                        channel.poll(index, [self.ctx.model_id], self.ctx.config.poll_wait_s)
                    )
                else:
                    poll = asyncio.create_task(
                        self.ctx.client.call(
                            "/api/v1/work/poll",
                            {"models": [self.ctx.model_id], "wait_s": self.ctx.config.poll_wait_s},
                            timeout=self.ctx.config.poll_wait_s + 15,
                        )
                    )
                drain = asyncio.create_task(self.ctx.draining.wait())
                await asyncio.wait({poll, drain}, return_when=asyncio.FIRST_COMPLETED)
                if not poll.done():
                    # Draining: abandon the poll. A task claimed in the same instant is
                    # handed back (channel) or picked up by the coordinator's supervisor
                    # once we stop heartbeating (HTTP).
                    poll.cancel()
                    drain.cancel()
                    if channel is not None:
                        await channel.cancel_poll(index)
                    return
                drain.cancel()
                answer = poll.result()
            except ChannelClosed:
                continue  # the next poll goes over HTTP until the channel is back
            except (httpx.TransportError, CoordinatorError) as exc:
                log.warning("poll failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            except AuthError as exc:
                # Refused (e.g. ejected, or the coordinator lost our registration): register
                # again, backing off so that a refused node does not spin (it logged 66,000
                # lines in 7 minutes before).
                refusals += 1
                wait = min(2.0 ** min(refusals - 1, 6), 60.0)
                log.warning(
                    "refused by the coordinator (%s); registering again in %.0f s", exc, wait
                )
                await self._sleep_unless_draining(wait)
                await self._register()
                continue
            except Exception:  # one bad answer must not kill the slot
                log.exception("poll failed unexpectedly")
                await asyncio.sleep(1.0)
                continue
            refusals = 0
            if answer is None:
                continue
            try:
                await self.serve(engine, TaskMsg.model_validate(answer))
            except Exception:  # the coordinator reclaims the task; keep the slot alive
                log.exception("serving %s failed unexpectedly", answer.get("task_id"))

    async def _sleep_unless_draining(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ctx.draining.wait(), seconds)

    async def serve(self, engine: Engine, task: TaskMsg) -> None:
        """Run one task attempt, streaming pieces up as they come (in a span when tracing)."""
        if not tracing.enabled():
            return await self._serve(engine, task)
        ids = {"task_id": task.task_id, "attempt": task.attempt, "request_id": task.request_id}
        attributes = {f"idlegrid.{k}": v for k, v in ids.items()} | {"idlegrid.model": task.model}
        with tracing.span("idlegrid.provider.serve", attributes, parent=task.traceparent):
            await self._serve(engine, task)

    async def _serve(self, engine: Engine, task: TaskMsg) -> None:
        job = _Job(task)
        self.jobs.add(job)
        base = f"/api/v1/tasks/{task.task_id}/attempts/{task.attempt}"
        # The consumer's request id, so one grep follows a request from gateway to here.
        rid = task.request_id or "-"
        log.info(
            "task %s attempt %d request_id=%s: serving",
            task.task_id,
            task.attempt,
            rid,
            extra={"request_id": task.request_id},
        )
        try:
            if task.kind == "embedding" or is_embedder(engine):
                from idlegrid.agent import embedding

                if await embedding.serve(self.ctx, engine, task):
                    self.served += 1
                return
            try:
                prompt_ids = self._prompt_ids(engine, task)
                sampling_params(task)
            except IdlegridError as exc:
                await self._invalid(base, exc)
                return
            queue: asyncio.Queue[Any] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            result = Generation()
            committed: dict[str, str] = {}
            meter = self.ctx.config.meter
            energy_key = f"{task.task_id}/{task.attempt}"
            if meter is not None:
                self.energy.start(energy_key, meter.joules())
            worker = loop.run_in_executor(
                self.engine_threads,
                self._generate_locked,
                engine,
                task,
                prompt_ids,
                job,
                queue,
                loop,
                result,
                committed,
            )
            ok = await self._upload(base, queue, job)
            try:
                await worker
            except InvalidRequest as exc:  # e.g. a logit_bias id outside the vocabulary
                await self._invalid(base, exc)
                return
            except Exception as exc:
                log.exception("engine failed on %s", task.task_id)
                await self._fail(
                    base,
                    f"engine error: {exc}",
                    "engine",
                    self._part(engine, task, prompt_ids, job),
                )
                return
            finally:
                energy_j = (
                    self.energy.finish(energy_key, meter.joules()) if meter is not None else None
                )
            if not ok:
                return  # the coordinator took the task away; it is someone else's now
            if job.cancel.is_set():
                why = "yielded to interactive work" if job.yielded else "provider draining"
                await self._fail(base, why, "handback", self._part(engine, task, prompt_ids, job))
                return
            if committed.get("blob"):
                self.ctx.remember(
                    self.ctx.commitments,
                    (task.task_id, task.attempt),
                    base64.b64decode(committed["blob"]),
                )
            await self.ctx.client.call(
                f"{base}/finish",
                {
                    "prompt_tokens": len(prompt_ids),
                    "finish_reason": result.finish_reason,
                    "commitment": committed.get("blob"),
                    "energy_j": energy_j,
                    "energy_estimated": bool(meter and meter.estimated),
                },
            )
            self.served += 1
            tracing.annotate(
                prompt_tokens=len(prompt_ids),
                completion_tokens=job.delivered,
                finish_reason=result.finish_reason,
                commitment_bytes=len(base64.b64decode(committed.get("blob") or "")),
            )
        except Conflict:
            log.info(
                "task %s attempt %d request_id=%s was taken away", task.task_id, task.attempt, rid
            )
        except (httpx.HTTPError, IdlegridError) as exc:
            log.warning("task %s request_id=%s: %s", task.task_id, rid, exc)
            tracing.annotate(error=str(exc)[:200])
        finally:
            self.jobs.discard(job)

    async def _invalid(self, base: str, exc: IdlegridError) -> None:
        """The request itself is bad for every provider: say which field."""
        param = getattr(exc, "param", None)
        body = {"reason": exc.message[:500], "kind": "invalid_request"}
        tracing.annotate(handed_back=f"invalid_request: {exc.message[:200]}")
        await self.ctx.client.call(f"{base}/fail", {**body, "param": param} if param else body)

    async def _fail(self, base: str, reason: str, kind: str, commitment: str | None = None) -> None:
        tracing.annotate(handed_back=f"{kind}: {reason[:200]}")
        with contextlib.suppress(Conflict):
            try:
                await self.ctx.client.call(
                    f"{base}/fail", {"reason": reason[:500], "kind": kind, "commitment": commitment}
                )
            except InvalidRequest as exc:
                if commitment is None:
                    raise
                # Hand the request on regardless; this part just goes unaudited.
                log.warning("part commitment refused (%s); handing back without it", exc)
                await self.ctx.client.call(f"{base}/fail", {"reason": reason[:500], "kind": kind})

    def _part(self, engine: Engine, task: TaskMsg, prompt_ids: list[int], job: _Job) -> str | None:
        """Commitment to the tokens this attempt delivered before it stopped (failover)."""
        rec, n = job.recorder, job.delivered
        if rec is None or n <= 0 or len(rec.tokens) < n:
            return None
        from idlegrid.engines.commit import Recorder, build_commitment

        # a batched answer's part keeps its batch shapes: the verifier replays on them
        part = Recorder(
            rec.tokens[:n],
            rec.states[:n],
            rec.logprobs[:n],
            shapes=rec.shapes[:n],
            chunk=rec.chunk,
            prompt=rec.prompt,
        )
        c = build_commitment(
            engine,
            task.model,
            [*prompt_ids, *task.prior_ids],
            part,
            task.seed,
            task.temperature,
            task.top_p,
            "length",
            extras=task_extras(task),
            constraint=_constraint(task),
        )
        blob = c.encode()
        self.ctx.remember(self.ctx.commitments, (task.task_id, task.attempt), blob)
        return base64.b64encode(blob).decode()

    def _prompt_ids(self, engine: Engine, task: TaskMsg) -> list[int]:
        if task.kind == "chat":
            text = render_chat(engine, task.messages or [])
        else:
            text = task.prompt or ""
        ids = engine.tokenize(text)
        if len(ids) + len(task.prior_ids) >= engine.context_length:
            raise InvalidRequest(
                f"prompt is {len(ids)} tokens; this model's context is {engine.context_length}",
                param="prompt",
            )
        return ids

    def _generate_locked(
        self,
        engine: Engine,
        task: TaskMsg,
        prompt_ids: list[int],
        job: _Job,
        queue: asyncio.Queue[Any],
        loop: asyncio.AbstractEventLoop,
        result: Generation,
        committed: dict[str, str],
    ) -> None:
        with self.ctx.engine_lock(engine):
            self._generate(engine, task, prompt_ids, job, queue, loop, result, committed)

    @staticmethod
    def _generate(
        engine: Engine,
        task: TaskMsg,
        prompt_ids: list[int],
        job: _Job,
        queue: asyncio.Queue[Any],
        loop: asyncio.AbstractEventLoop,
        result: Generation,
        committed: dict[str, str] | None = None,
    ) -> None:
        room = engine.context_length - len(prompt_ids)
        params = sampling_params(task)
        if params.grammar is not None and not engine.describe().get("grammar"):
            # Never served unconstrained; the coordinator routes these elsewhere.
            raise EngineError("this engine cannot constrain output", engine=engine.name)
        if hasattr(engine, "urgent"):  # a batching engine: is a first token waited for?
            engine.urgent = task.stream
        recorder = None
        if committed is not None and hasattr(engine, "recorder") and hasattr(engine, "audit"):
            from idlegrid.engines.commit import Recorder

            recorder = Recorder()
            engine.recorder = recorder
            job.recorder = recorder
        job.generating = True
        try:
            if task.prompt_logprobs is not None:
                scored = score_prompt(engine, prompt_ids, task.prompt_logprobs)
                if recorder is not None:
                    recorder.prompt = scored
                job.prompt = prompt_msg(engine, prompt_ids, scored)
                loop.call_soon_threadsafe(queue.put_nowait, _PROMPT)
            for piece in stream_pieces(
                engine,
                prompt_ids,
                params,
                max_tokens=min(task.max_tokens, room),
                stop=task.stop,
                prior_ids=task.prior_ids,
                result=result,
            ):
                if job.cancel.is_set():
                    break
                if task.logprobs is not None:  # before the piece: the uploader reads it after
                    job.logprobs.append(logprob_msg(engine, piece.logprobs))
                loop.call_soon_threadsafe(queue.put_nowait, (piece.token_id, piece.text))
            job.generating = False
            if recorder is not None and committed is not None and not job.cancel.is_set():
                from idlegrid.engines.commit import build_commitment

                # Committed before finish is sent, so before any audit can be selected.
                c = build_commitment(
                    engine,
                    task.model,
                    [*prompt_ids, *task.prior_ids],
                    recorder,
                    task.seed,
                    task.temperature,
                    task.top_p,
                    result.finish_reason,
                    extras=task_extras(task),
                    constraint=_constraint(task),
                )
                committed["blob"] = base64.b64encode(c.encode()).decode()
        finally:
            job.generating = False
            if recorder is not None:
                engine.recorder = None  # type: ignore[attr-defined]
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    async def _upload(self, base: str, queue: asyncio.Queue[Any], job: _Job) -> bool:
        """Send pieces in order, batching what accumulates; False if the task was taken away."""
        sent = 0
        finished = False
        last_upload = 0.0
        loop = asyncio.get_running_loop()
        config = self.ctx.config
        interval = (
            config.upload_interval_s
            if job.task.stream
            else max(config.upload_interval_s, config.batch_upload_interval_s)
        )
        channel = self.channel if self.channel is not None and self.channel.open else None
        up = channel.track(job.task.task_id, job.task.attempt, job.cancel.set) if channel else None
        try:
            while not finished:
                # The first piece goes at once (time to first token); later ones are
                # coalesced for up to `upload_interval_s`, which bounds uploads per second
                # per stream without a delay anyone reading the stream could notice.
                wait = last_upload + interval - loop.time()
                if sent and wait > 0:
                    await asyncio.sleep(wait)
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                if batch[-1] is _DONE:
                    finished = True
                    batch.pop()
                if batch and batch[0] is _PROMPT:  # over HTTP, acknowledged before any piece
                    batch.pop(0)
                    if not job.cancel.is_set():
                        await self.ctx.client.call(
                            f"{base}/upload", {"start": 0, "pieces": [], "prompt": job.prompt}
                        )
                if not batch or job.cancel.is_set():
                    continue
                last_upload = loop.time()
                if not sent:  # the prompt is prefilled: its end, on the serving span's timeline
                    tracing.event("idlegrid.first_token")
                if up is not None and channel is not None and not up.lost:
                    with contextlib.suppress(ChannelClosed):  # kept as unacked: resent below
                        await channel.upload(up, sent, batch, _lps(job, sent, len(batch)))
                else:
                    if up is not None and channel is not None:  # the channel went down:
                        await self._settle(base, job, up, channel)  # what it left goes first
                    await self._upload_http(base, job, sent, batch)
                sent += len(batch)
            if up is not None and channel is not None:
                await self._settle(base, job, up, channel)
        except Conflict:
            job.cancel.set()
            await self._drain_queue(queue, finished)
            return False
        finally:
            if up is not None and channel is not None:
                channel.forget(up)
        return True

    async def _upload_http(self, base: str, job: _Job, start: int, batch: list[Any]) -> None:
        body: dict[str, Any] = {"start": start, "pieces": batch}
        lps = _lps(job, start, len(batch))
        if lps is not None:
            body["logprobs"] = lps
        await self.ctx.client.call(f"{base}/upload", body)
        job.delivered += sum(1 for tid, _ in batch if tid >= 0)

    async def _settle(self, base: str, job: _Job, up: Uploads, channel: Channel) -> None:
        """Wait until the coordinator acknowledged every channel upload of this attempt
        (resending over HTTP what a lost channel left unacknowledged); Conflict if refused."""
        if up.unacked and not up.lost:
            with contextlib.suppress(ChannelClosed):
                await channel.sync(up)
        while not up.synced and up.refused is None and not up.lost:
            up.changed.clear()
            await up.changed.wait()
        if up.refused is not None:
            raise up.refused
        job.delivered += up.acked_tokens
        up.acked_tokens = 0
        while up.unacked:  # uploads are idempotent by start index: resending is safe
            start, batch = up.unacked.pop(0)
            await self._upload_http(base, job, start, batch)

    @staticmethod
    async def _drain_queue(queue: asyncio.Queue[Any], finished: bool) -> None:
        while not finished:
            finished = await queue.get() is _DONE


def sampling_params(task: TaskMsg) -> SamplingParams:
    """The engine's sampling parameters for a task, its grammar included (InvalidRequest
    naming a bad field)."""
    from idlegrid.core.trust import adjust

    try:
        adj = adjust.make(task.presence_penalty, task.frequency_penalty, task.logit_bias)
    except adjust.AdjustError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc
    return SamplingParams(
        task.temperature,
        task.top_p,
        task.seed,
        None if adj.neutral else adj,
        task.logprobs,
        grammar=GrammarSpec.from_wire(task.grammar) if task.grammar else None,
    )


def task_extras(task: TaskMsg) -> Any:
    """What the commitment records beyond seed/temperature/top_p: the coordinator expects
    exactly the request's (`extras.expected`)."""
    from idlegrid.core.trust.extras import expected

    return expected(
        task.presence_penalty,
        task.frequency_penalty,
        task.logit_bias,
        task.logprobs,
        len(task.prior_ids),
    )


def _lps(job: _Job, start: int, n: int) -> list[Any] | None:
    return job.logprobs[start : start + n] if job.task.logprobs is not None else None
