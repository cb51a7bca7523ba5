"""The provider agent: register, heartbeat, long-poll for work, serve it, drain on SIGTERM.

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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from idlegrid import PROTOCOL_VERSION
from idlegrid.agent.channel import CHANNEL_PATH, Channel, ChannelClosed, Uploads
from idlegrid.agent.hardware.power import PowerMeter
from idlegrid.agent.node_client import CoordinatorError, NodeClient
from idlegrid.core.energy import Attribution
from idlegrid.core.ledger import Price
from idlegrid.core.market.hardware import device_groups
from idlegrid.engines.base import Engine, Generation, SamplingParams, render_chat, stream_pieces
from idlegrid.errors import AuthError, Conflict, IdlegridError, InvalidRequest
from idlegrid.protocol.messages import TaskMsg

log = logging.getLogger("idlegrid.agent")

_DONE = object()


@dataclass
class AgentConfig:
    """What an agent advertises and how it behaves."""

    name: str
    price: Price
    hardware: dict[str, Any]
    prefill_tps: float
    decode_tps: float
    drain_grace_s: float = 30.0
    poll_wait_s: float = 15.0
    upload_interval_s: float = 0.025
    # The same for a consumer that is not streaming: it sees nothing until the end, so only
    # failover and stall detection read these uploads.
    batch_upload_interval_s: float = 0.25
    # Take tasks and send output on the agent channel (a WebSocket) while it is up;
    # False: the HTTP long poll and one request per upload only.
    channel: bool = True
    # Market: where the node is, what a device-hour costs (µcr; None sells no device-hours),
    # the device groups on sale (default: what the probe found), measured links to peers
    # (node id -> Gbit/s), and the stake to post per device once the balance allows it.
    region: str = "local"
    device_price_h: int | None = None
    devices: list[dict[str, Any]] | None = None
    links: dict[str, float] = field(default_factory=dict)
    stake_per_device: int = 0
    # Verifier mode: also take audits (re-check other providers' answers) on engine 0.
    verifier: bool = False
    # Where energy readings come from (agent.hardware.power.choose_meter); None reports no energy.
    meter: PowerMeter | None = None
    # Training (agent/roles/trainer.py): take training jobs, and/or re-execute audited segments.
    # The executor and the verify function are the honest ones unless a test plugs in cheats.
    trainer: bool = False
    train_verifier: bool = False
    train_threads: int | None = None
    # Host this node serves a data-parallel gang's rendezvous on (loopback on a local grid);
    # None: it takes single-provider training jobs only.
    train_gang_host: str | None = None
    # How long a gang member waits for the others (rendezvous, then each collective) before
    # the gang's segment fails and the job resumes from its last committed checkpoint.
    train_gang_timeout_s: float = 60.0
    train_executor: Any = None
    train_verify: Any = None


@dataclass(eq=False)  # identity semantics: jobs live in a set
class _Job:
    task: TaskMsg
    cancel: threading.Event = field(default_factory=threading.Event)
    delivered: int = 0  # token ids the coordinator accepted for this attempt
    recorder: Any = None  # what the engine recorded, for a part's commitment at handback


class Agent:
    """A provider agent serving one model on one or more engine instances."""

    def __init__(self, client: NodeClient, engines: Sequence[Engine], config: AgentConfig,
                 prover: Any = None) -> None:
        if not engines:
            raise ValueError("an agent needs at least one engine")
        self.client = client
        self.engines = list(engines)
        self.model_id = engines[0].model_id
        self.config = config
        self.heartbeat_s = 2.0
        self.draining = asyncio.Event()
        self.jobs: set[_Job] = set()
        self.served = 0
        self.audited = 0
        # Engines are not thread-safe: serving and auditing on engine 0 take turns.
        self._engine_locks = {id(e): threading.Lock() for e in self.engines}
        self.energy = Attribution()
        bind = getattr(config.meter, "bind_busy", None)
        if bind is not None:  # an estimating meter draws serving power only while serving
            bind(lambda: len(self.energy.active))
        # Hardware challenges: the prover answers them (testbed cheats plug in here).
        self.prover = prover
        self.hw_verdicts: dict[str, Any] = {}
        self._proving: set[str] = set()
        self.train_checkpoints: dict[tuple[str, int], bytes] = {}
        self.trained_segments = 0
        self.train_timing = {"train_s": 0.0, "commit_s": 0.0}
        self.train_audited = 0
        # Our recent commitments, to open chunks when a dispute asks (task, attempt) -> blob;
        # a verifier's recent reports by audit id, to answer for its numbers.
        self.commitments: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.audit_reports: OrderedDict[str, bytes] = OrderedDict()
        self.dispute_answers: dict[str, Any] = {}
        # Training disputes: per (dispute, role) what was recomputed for earlier rounds.
        self.train_dispute_cache: dict[tuple[str, str], dict[str, Any]] = {}
        self._answering: set[str] = set()
        self.channel: Channel | None = None

    # ---- protocol ----------------------------------------------------------------------

    async def register(self) -> None:
        """Announce hardware, engine, measured speed and prices."""
        answer = await self.client.call("/api/v1/nodes/register", {
            "protocol_version": PROTOCOL_VERSION,
            "name": self.config.name,
            "hardware": self.config.hardware,
            "engine": self.engines[0].describe(),
            "slots": len(self.engines),
            "prefill_tps": self.config.prefill_tps,
            "decode_tps": self.config.decode_tps,
            "offers": [{"model": self.model_id, "prompt_price": self.config.price.prompt,
                        "output_price": self.config.price.output}],
            "region": self.config.region,
            "links": self.config.links,
            "devices": self._devices(),
            "verifier": self.config.verifier or self.config.train_verifier,
        })
        assert answer is not None
        self.heartbeat_s = float(answer["heartbeat_interval_s"])
        log.info("registered as %s (%s)", answer["node_id"], self.config.name)

    def _devices(self) -> list[dict[str, Any]]:
        if self.config.device_price_h is None:
            return []
        groups = self.config.devices or device_groups(self.config.hardware)
        return [{**g, "price_h": g.get("price_h", self.config.device_price_h)} for g in groups]

    async def stake(self) -> bool:
        """Post the configured stake for every device group; False while the balance is short."""
        if not self.config.stake_per_device:
            return True
        for g in self._devices():
            amount = self.config.stake_per_device * g["count"]
            try:
                await self.client.call("/api/v1/nodes/stake", {
                    "device_class": g["model"], "amount": amount,
                    "ref": f"auto-{g['model']}-{amount}"})
            except CoordinatorError as exc:
                if exc.data.get("status") == 402:  # not enough credits yet
                    return False
                raise
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain: finish or hand back what is held."""
        from idlegrid.agent.roles.hwprover import HonestProver

        self.prover = self.prover or HonestProver()
        await asyncio.get_running_loop().run_in_executor(None, self.prover.warm)
        await self._until_registered(stop)
        beats = asyncio.create_task(self._heartbeats())
        await self._connect_channel()  # before the slots, or their first polls go over HTTP
        keeper = asyncio.create_task(self._keep_channel())
        slots = [asyncio.create_task(self._slot(e, i)) for i, e in enumerate(self.engines)]
        if self.config.verifier:  # inference audits
            from idlegrid.agent.roles.verifier import audit_loop

            slots.append(asyncio.create_task(audit_loop(self, self.engines[0])))
        if self.config.trainer:
            from idlegrid.agent.roles.trainer import probe_loop, train_loop

            slots.append(asyncio.create_task(train_loop(self)))
            slots.append(asyncio.create_task(probe_loop(self)))
        if self.config.train_verifier:
            from idlegrid.agent.roles.trainer import train_audit_loop

            slots.append(asyncio.create_task(train_audit_loop(self)))
        await stop.wait()
        log.info("draining: no new work; finishing %d held request(s)", len(self.jobs))
        self.draining.set()
        with contextlib.suppress(httpx.HTTPError, IdlegridError):
            await self.client.call("/api/v1/nodes/heartbeat", {"state": "draining"})
        done, pending = await asyncio.wait(slots, timeout=self.config.drain_grace_s)
        if pending:
            for job in list(self.jobs):
                job.cancel.set()  # the serve loop hands these back
            await asyncio.wait(pending, timeout=10)
        beats.cancel()
        keeper.cancel()
        if self.channel is not None:
            await self.channel.close()
        await self.client.close()

    async def _until_registered(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while not stop.is_set():
            try:
                await self.register()
                return
            except (httpx.TransportError, AuthError) as exc:
                log.warning("coordinator not reachable yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _connect_channel(self) -> bool:
        """Open the agent channel (False if it cannot be had; HTTP is used meanwhile)."""
        url = self.client.ws_url(CHANNEL_PATH)
        if not self.config.channel or url is None:
            return False
        channel = Channel(self.client)
        channel.on_orphan = lambda task: asyncio.create_task(self._hand_back(task))
        try:
            await channel.connect(url)
        except Exception as exc:  # refused handshake, no such route (older coordinator)
            log.info("agent channel unavailable (%s); using HTTP", exc)
            return False
        self.channel = channel
        return True

    async def _keep_channel(self) -> None:
        """Hold the agent channel open, reconnecting after a loss; slots use HTTP meanwhile."""
        if not self.config.channel or self.client.ws_url(CHANNEL_PATH) is None:
            return
        delay = 1.0
        while not self.draining.is_set():
            if self.channel is not None and self.channel.open:
                delay = 1.0
                await self.channel.closed.wait()
            elif not await self._connect_channel():
                delay = min(2 * delay, 30.0)
            await asyncio.sleep(delay)

    async def _hand_back(self, task: dict[str, Any]) -> None:
        """Return a task that reached a slot after it stopped waiting (draining)."""
        with contextlib.suppress(httpx.HTTPError, IdlegridError):
            await self.client.call(
                f"/api/v1/tasks/{task['task_id']}/attempts/{task['attempt']}/fail",
                {"reason": "provider draining", "kind": "handback"})

    async def _heartbeats(self) -> None:
        staked = False
        while True:
            if not staked:
                # A new provider earns or is given credits first; until then it keeps trying.
                try:
                    staked = await self.stake()
                except (httpx.HTTPError, IdlegridError) as exc:
                    log.warning("staking failed: %s", exc)
            await asyncio.sleep(self.heartbeat_s)
            state = "draining" if self.draining.is_set() else "live"
            try:
                beat = await self.client.call("/api/v1/nodes/heartbeat",
                                              {"state": state, "in_flight": len(self.jobs),
                                               "power": self.power_report()})
                for pid in (beat or {}).get("hwproofs", []):
                    if pid not in self._proving and pid not in self.hw_verdicts:
                        self._proving.add(pid)
                        asyncio.create_task(self._prove(pid))
                for q in (beat or {}).get("disputes", []):
                    qid = f"{q['id']}/{q['round']}/{q['role']}"
                    if qid not in self._answering and qid not in self.dispute_answers:
                        self._answering.add(qid)
                        asyncio.create_task(self._answer_dispute(qid, q))
                for q in (beat or {}).get("train_disputes", []):
                    qid = f"train/{q['id']}/{q['round']}/{q['role']}"
                    if qid not in self._answering and qid not in self.dispute_answers:
                        self._answering.add(qid)
                        asyncio.create_task(self._answer_dispute(qid, q, training=True))
            except AuthError:
                await self.register()  # the coordinator forgot us (fresh database)
            except (httpx.HTTPError, IdlegridError) as exc:
                log.warning("heartbeat failed: %s", exc)

    async def _prove(self, pid: str) -> None:
        """Answer one hardware challenge beside serving (the coordinator times it)."""
        from idlegrid.agent.roles.hwprover import HonestProver, prove

        try:
            self.hw_verdicts[pid] = await prove(self, pid, self.prover or HonestProver())
        except (httpx.HTTPError, IdlegridError) as exc:
            log.warning("hardware proof %s: %r", pid, exc)
            self.hw_verdicts[pid] = {"error": str(exc)}
        except Exception:  # a bad challenge must not kill the heartbeat loop
            log.exception("hardware proof %s failed unexpectedly", pid)
            self.hw_verdicts[pid] = {"error": "unexpected"}
        finally:
            self._proving.discard(pid)

    async def _answer_dispute(self, qid: str, q: dict[str, Any], training: bool = False) -> None:
        """Answer one dispute round beside serving (a party that stays silent loses)."""
        from idlegrid.agent.roles import disputes, train_disputes

        answer = train_disputes.answer if training else disputes.answer
        try:
            self.dispute_answers[qid] = await answer(self, q)
        except (httpx.HTTPError, IdlegridError) as exc:
            log.warning("dispute %s: %r", qid, exc)
            self.dispute_answers[qid] = {"error": str(exc)}
        except Exception:  # a bad query must not kill the heartbeat loop
            log.exception("dispute %s failed unexpectedly", qid)
            self.dispute_answers[qid] = {"error": "unexpected"}
        finally:
            self._answering.discard(qid)

    def remember(self, store: OrderedDict[Any, bytes], key: Any, blob: bytes) -> None:
        """Keep a recent commitment or report (the oldest go beyond 4,096)."""
        store[key] = blob
        while len(store) > 4096:
            store.popitem(last=False)

    async def _slot(self, engine: Engine, index: int = 0) -> None:
        refusals = 0
        while not self.draining.is_set():
            channel = self.channel if self.channel is not None and self.channel.open else None
            try:
                if channel is not None:
                    poll = asyncio.create_task(channel.poll(
                        index, [self.model_id], self.config.poll_wait_s))
                else:
                    poll = asyncio.create_task(self.client.call(
                        "/api/v1/work/poll",
                        {"models": [self.model_id], "wait_s": self.config.poll_wait_s},
                        timeout=self.config.poll_wait_s + 15,
                    ))
                drain = asyncio.create_task(self.draining.wait())
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
                log.warning("refused by the coordinator (%s); registering again in %.0f s",
                            exc, wait)
                await self._sleep_unless_draining(wait)
                await self.register()
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
            await asyncio.wait_for(self.draining.wait(), seconds)

    def power_report(self) -> dict[str, Any] | None:
        """The energy counter and current draw, for heartbeats (None without a meter)."""
        meter = self.config.meter
        if meter is None:
            return None
        joules = meter.joules()
        self.energy.advance(joules)
        return {"joules_total": joules, "watts": meter.watts(), "source": meter.source,
                "estimated": meter.estimated}

    # ---- serving -----------------------------------------------------------------------

    async def serve(self, engine: Engine, task: TaskMsg) -> None:
        """Run one task attempt, streaming pieces up as they come."""
        job = _Job(task)
        self.jobs.add(job)
        base = f"/api/v1/tasks/{task.task_id}/attempts/{task.attempt}"
        try:
            try:
                prompt_ids = self._prompt_ids(engine, task)
            except IdlegridError as exc:
                await self.client.call(f"{base}/fail", {"reason": exc.message,
                                                         "kind": "invalid_request"})
                return
            queue: asyncio.Queue[Any] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            result = Generation()
            committed: dict[str, str] = {}
            meter = self.config.meter
            energy_key = f"{task.task_id}/{task.attempt}"
            if meter is not None:
                self.energy.start(energy_key, meter.joules())
            worker = loop.run_in_executor(
                None, self._generate_locked, engine, task, prompt_ids, job, queue, loop, result,
                committed,
            )
            ok = await self._upload(base, queue, job)
            try:
                await worker
            except Exception as exc:
                log.exception("engine failed on %s", task.task_id)
                await self._fail(base, f"engine error: {exc}", "engine",
                                 self._part(engine, task, prompt_ids, job))
                return
            finally:
                energy_j = (self.energy.finish(energy_key, meter.joules())
                            if meter is not None else None)
            if not ok:
                return  # the coordinator took the task away; it is someone else's now
            if job.cancel.is_set():
                await self._fail(base, "provider draining", "handback",
                                 self._part(engine, task, prompt_ids, job))
                return
            if committed.get("blob"):
                self.remember(self.commitments, (task.task_id, task.attempt),
                              base64.b64decode(committed["blob"]))
            await self.client.call(f"{base}/finish", {
                "prompt_tokens": len(prompt_ids), "finish_reason": result.finish_reason,
                "commitment": committed.get("blob"),
                "energy_j": energy_j, "energy_estimated": bool(meter and meter.estimated),
            })
            self.served += 1
        except Conflict:
            log.info("task %s attempt %d was taken away", task.task_id, task.attempt)
        except (httpx.HTTPError, IdlegridError) as exc:
            log.warning("task %s: %s", task.task_id, exc)
        finally:
            self.jobs.discard(job)

    async def _fail(self, base: str, reason: str, kind: str, commitment: str | None = None
                    ) -> None:
        with contextlib.suppress(Conflict):
            try:
                await self.client.call(f"{base}/fail", {"reason": reason[:500], "kind": kind,
                                                        "commitment": commitment})
            except InvalidRequest as exc:
                if commitment is None:
                    raise
                # Hand the request on regardless; this part just goes unaudited.
                log.warning("part commitment refused (%s); handing back without it", exc)
                await self.client.call(f"{base}/fail", {"reason": reason[:500], "kind": kind})

    def _part(self, engine: Engine, task: TaskMsg, prompt_ids: list[int], job: _Job
              ) -> str | None:
        """Commitment to the tokens this attempt delivered before it stopped (failover)."""
        rec, n = job.recorder, job.delivered
        if rec is None or n <= 0 or len(rec.tokens) < n:
            return None
        from idlegrid.engines.commit import Recorder, build_commitment

        part = Recorder(rec.tokens[:n], rec.states[:n])
        c = build_commitment(engine, task.model, [*prompt_ids, *task.prior_ids], part,
                             task.seed, task.temperature, task.top_p, "length")
        blob = c.encode()
        self.remember(self.commitments, (task.task_id, task.attempt), blob)
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

    def _generate_locked(self, engine: Engine, task: TaskMsg, prompt_ids: list[int], job: _Job,
                         queue: asyncio.Queue[Any], loop: asyncio.AbstractEventLoop,
                         result: Generation, committed: dict[str, str]) -> None:
        with self._engine_locks[id(engine)]:
            self._generate(engine, task, prompt_ids, job, queue, loop, result, committed)

    @staticmethod
    def _generate(engine: Engine, task: TaskMsg, prompt_ids: list[int], job: _Job,
                  queue: asyncio.Queue[Any], loop: asyncio.AbstractEventLoop,
                  result: Generation, committed: dict[str, str] | None = None) -> None:
        room = engine.context_length - len(prompt_ids)
        params = SamplingParams(task.temperature, task.top_p, task.seed)
        recorder = None
        if committed is not None and hasattr(engine, "recorder") and hasattr(engine, "audit"):
            from idlegrid.engines.commit import Recorder

            recorder = Recorder()
            engine.recorder = recorder
            job.recorder = recorder
        try:
            for piece in stream_pieces(engine, prompt_ids, params,
                                       max_tokens=min(task.max_tokens, room), stop=task.stop,
                                       prior_ids=task.prior_ids, result=result):
                if job.cancel.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, (piece.token_id, piece.text))
            if recorder is not None and committed is not None and not job.cancel.is_set():
                from idlegrid.engines.commit import build_commitment

                # Committed before finish is sent, so before any audit can be selected.
                c = build_commitment(engine, task.model, [*prompt_ids, *task.prior_ids],
                                     recorder, task.seed, task.temperature, task.top_p,
                                     result.finish_reason)
                committed["blob"] = base64.b64encode(c.encode()).decode()
        finally:
            if recorder is not None:
                engine.recorder = None  # type: ignore[attr-defined]
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    async def _upload(self, base: str, queue: asyncio.Queue[Any], job: _Job) -> bool:
        """Send pieces in order, batching what accumulates; False if the task was taken away."""
        sent = 0
        finished = False
        last_upload = 0.0
        loop = asyncio.get_running_loop()
        interval = (self.config.upload_interval_s if job.task.stream
                    else max(self.config.upload_interval_s, self.config.batch_upload_interval_s))
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
                if not batch or job.cancel.is_set():
                    continue
                last_upload = loop.time()
                if up is not None and channel is not None and not up.lost:
                    with contextlib.suppress(ChannelClosed):  # kept as unacked: resent below
                        await channel.upload(up, sent, batch)
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
        await self.client.call(f"{base}/upload", {"start": start, "pieces": batch})
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
