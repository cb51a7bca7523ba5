"""Training on the agent: run job segments and commit each one before any audit draw; in
verifier mode, re-execute audited segments from the provider's committed checkpoint and
report the recomputed leaves (never just "ok").

Training runs in a worker thread (torch releases the GIL); progress goes up from the
event loop every half second. The executor is an object with a small interface so that
testbed cheats plug in where the honest torch executor would be.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from idlegrid.agent.context import AgentConfig, AgentContext, Role
from idlegrid.agent.node_client import CoordinatorError
from idlegrid.errors import AuthError, Conflict, IdlegridError, InvalidRequest
from idlegrid.protocol.training import TrainAuditMsg, TrainWorkMsg

log = logging.getLogger("idlegrid.agent.trainer")
PROGRESS_EVERY_S = 0.5


class Executor(Protocol):
    """What the agent needs from a training executor (training/verified.py, or a cheat)."""

    def det_class(self, spec: Any) -> str:
        """The determinism class this executor computes in."""

    def start(self, spec: Any, checkpoint: bytes | None) -> Any:
        """The state to train from: a checkpoint, or the initial state from the spec."""

    def run(
        self, spec: Any, state: Any, end_step: int, on_step: Callable[[Any, float], None]
    ) -> tuple[Any, list[Any]]:
        """Train up to `end_step`; the state after it and one leaf per step."""

    def checkpoint(self, spec: Any, state: Any) -> bytes:
        """The state as checkpoint bytes."""

    def initial_checkpoint(self, spec: Any) -> bytes:
        """The checkpoint of step 0, derived from the spec alone."""

    def state_hash(self, spec: Any, state: Any) -> bytes:
        """The hash of a state (weights, optimizer state, step) that leaves commit to."""

    def checkpoint_hash(self, spec: Any, data: bytes) -> bytes:
        """The state hash a checkpoint captures (equals that step's committed leaf)."""

    def replay(
        self, spec: Any, start: bytes, start_step: int, end_step: int
    ) -> tuple[list[Any], bytes]:
        """A verifier's re-execution: leaves and the end checkpoint."""

    def weight_distance(self, spec: Any, mine: bytes, theirs: bytes, start: bytes) -> float:
        """Distance of two end checkpoints' weights, relative to the segment's update."""

    def trace(self, spec: Any, state: Any) -> list[bytes]:
        """Run one step in place under the op recorder: each op's record bytes (disputes)."""


class TorchExecutor:
    """`training/verified.py`, imported only when a job arrives. `trainer_cls` is its
    `Trainer` unless a test runs a cheat (testbed/training_cheats.py subclasses it)."""

    def __init__(self, threads: int | None = None, trainer_cls: Any = None) -> None:
        self.threads = threads
        self.trainer_cls = trainer_cls

    def _trainer(self, spec: Any) -> Any:
        from idlegrid.training.verified import Trainer

        if spec.parallel > 1:  # one process replays a gang's steps as its micro-batches
            return Trainer(spec, threads=self.threads, microbatches=spec.parallel)
        return (self.trainer_cls or Trainer)(spec, threads=self.threads)

    def start_gang(
        self,
        spec: Any,
        checkpoint: bytes | None,
        rank: int,
        world: int,
        rendezvous: str,
        prefix: str,
        my_host: str,
        timeout_s: float = 60.0,
    ) -> Any:
        """Join a data-parallel gang (rank 0 serves the rendezvous); its start state."""
        from idlegrid.training.dataparallel import DataParallelTrainer

        trainer = DataParallelTrainer(
            spec,
            rank,
            world,
            rendezvous,
            prefix=prefix,
            my_host=my_host,
            threads=self.threads,
            timeout_s=timeout_s,
        )
        state = trainer.initial_state() if checkpoint is None else trainer.load(checkpoint)
        return trainer, state

    def gang_class(self, state: Any) -> str:
        """The determinism class of a gang member's trainer."""
        return str(state[0].determinism_class())

    def leave_gang(self, state: Any) -> None:
        """Tear the gang's process group down."""
        state[0].close()

    def det_class(self, spec: Any) -> str:
        """The torch version, device, dtype and threads."""
        return str(self._trainer(spec).determinism_class())

    def start(self, spec: Any, checkpoint: bytes | None) -> Any:
        """Initial state (from the job seed) or a loaded checkpoint."""

        trainer = self._trainer(spec)
        state = trainer.initial_state() if checkpoint is None else trainer.load(checkpoint)
        return trainer, state

    def run(
        self, spec: Any, state: Any, end_step: int, on_step: Callable[[Any, float], None]
    ) -> tuple[Any, list[Any]]:
        """Train with the executor's trainer."""
        trainer, st = state
        st, leaves = trainer.run(st, end_step, on_step)
        return (trainer, st), list(leaves)

    def checkpoint(self, spec: Any, state: Any) -> bytes:
        """Checkpoint bytes of the current state."""
        from idlegrid.training import verified

        return bytes(verified.checkpoint_bytes(state[1]))

    def initial_checkpoint(self, spec: Any) -> bytes:
        """Step 0's checkpoint (weights from the init seed, a fresh optimizer)."""
        from idlegrid.training import verified

        return bytes(verified.checkpoint_bytes(self._trainer(spec).initial_state()))

    def state_hash(self, spec: Any, state: Any) -> bytes:
        """The state hash the trainer commits to."""
        trainer, st = state
        return bytes(trainer.state_hash(st))

    def checkpoint_hash(self, spec: Any, data: bytes) -> bytes:
        """The committed state hash of a checkpoint."""
        from idlegrid.training import verified

        return bytes(verified.checkpoint_hash(data))

    def replay(
        self, spec: Any, start: bytes, start_step: int, end_step: int
    ) -> tuple[list[Any], bytes]:
        """Re-execute a segment from its start checkpoint."""
        from idlegrid.training import verified

        leaves, end = verified.replay(
            spec, start, start_step, end_step, self.threads, microbatches=spec.parallel
        )
        return list(leaves), bytes(end)

    def weight_distance(self, spec: Any, mine: bytes, theirs: bytes, start: bytes) -> float:
        """‖mine − theirs‖ / ‖theirs − start‖ over the weights."""
        from idlegrid.training import verified

        return float(verified.weight_distance(mine, theirs, start))

    def trace(self, spec: Any, state: Any) -> list[bytes]:
        """The op records of the state's next step, run in place by this trainer."""
        trainer, st = state
        return [r.record_bytes() for r in trainer.trace_step(st).records]


class _Stop(Exception):
    """Raised inside the training thread when the job was taken away or the agent stops."""


@dataclass
class _Run:
    """One held job on the agent: what the uploader reads, what stops the worker."""

    base: str
    stop: Any = field(default_factory=lambda: __import__("threading").Event())
    latest: dict[str, float] | None = None
    sent: dict[str, float] | None = None


def executor(config: AgentConfig) -> Any:
    """The training executor `config` names (a test's cheat), else the honest torch one."""
    ex = config.train_executor
    return ex if ex is not None else TorchExecutor(config.train_threads)


def verify_segment(ex: Any, msg: TrainAuditMsg) -> dict[str, Any]:
    """Re-execute one audited segment from the provider's checkpoint; the report body."""
    from idlegrid.core.training.proof import TrainingCommitment
    from idlegrid.core.training.spec import JobSpec

    spec = JobSpec.parse(msg.spec)
    start = (
        base64.b64decode(msg.start_checkpoint)
        if msg.start_checkpoint
        else ex.initial_checkpoint(spec)
    )
    end = base64.b64decode(msg.end_checkpoint)
    committed = TrainingCommitment.from_bytes(base64.b64decode(msg.commitment))
    # Both checkpoints are bound to the commitment: the start one to its start hash, the
    # end one to its last leaf (a swapped, stale or invented checkpoint fails here).
    match = (
        ex.checkpoint_hash(spec, start) == committed.start_hash
        and ex.checkpoint_hash(spec, end) == committed.end_hash
    )
    if not match:  # nothing to replay from: that alone fails the segment
        return {
            "leaves": msg.commitment,
            "weight_distance": None,
            "det_class": ex.det_class(spec),
            "checkpoints_match": False,
        }
    leaves, mine = ex.replay(spec, start, msg.start_step, msg.end_step)
    mine_c = TrainingCommitment(
        msg.job_id, msg.start_step, list(leaves), ex.checkpoint_hash(spec, start)
    )
    return {
        "leaves": base64.b64encode(mine_c.to_bytes()).decode(),
        "weight_distance": ex.weight_distance(spec, mine, end, start),
        "det_class": ex.det_class(spec),
        "checkpoints_match": bool(match),
    }


class Training(Role):
    """Takes training jobs and answers availability probes (trainer), and re-executes audited
    segments (train verifier); owns the checkpoints kept for the challenge window."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        # By (job, end step): probes and training disputes ask for them after the commit.
        self.checkpoints: dict[tuple[str, int], bytes] = {}
        self.segments = 0  # segments trained and committed
        self.timing = {"train_s": 0.0, "commit_s": 0.0}
        self.audited = 0  # segment audits reported

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """Training and probes (trainer), segment audits (train verifier)."""
        config = self.ctx.config
        loops = [self.train_loop(), self.probe_loop()] if config.trainer else []
        if config.train_verifier:
            loops.append(self.audit_loop())
        return loops

    async def _poll(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """A long poll that a drain cuts short (a job claimed in that instant is reclaimed by the
        coordinator once the node stops heartbeating or its lease runs out)."""
        poll = asyncio.create_task(self.ctx.client.call(path, body, timeout=30))
        drain = asyncio.create_task(self.ctx.draining.wait())
        try:
            await asyncio.wait({poll, drain}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
        if not poll.done():
            poll.cancel()
            return None
        return poll.result()

    def _poll_body(self) -> dict[str, Any]:
        """The poll; with `train_gang_host`, the address this node would serve a gang on."""
        host = self.ctx.config.train_gang_host
        if not host:
            return {"wait_s": 5.0}
        import socket

        # A free port now; rank 0 binds it when the gang forms (a short race another process
        # could win, which fails that gang's start and re-queues the job, no worse).
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        return {"wait_s": 5.0, "gang_addr": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}

    async def train_loop(self) -> None:
        """Take training jobs until the agent drains."""
        ex = executor(self.ctx.config)
        while not self.ctx.draining.is_set():
            try:
                work = await self._poll("/api/v1/train/poll", self._poll_body())
            except (httpx.TransportError, CoordinatorError) as exc:
                log.warning("training poll failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            except AuthError:
                await asyncio.sleep(0.5)  # re-registration is the heartbeat loop's job
                continue
            if work is None:
                continue
            try:
                await self.run_job(ex, TrainWorkMsg.model_validate(work))
            except (httpx.HTTPError, IdlegridError) as exc:
                log.warning("training job %s: %s", work.get("job_id"), exc)
            except asyncio.CancelledError:
                raise
            except Exception:  # the coordinator takes the job back; keep the loop alive
                log.exception("training job %s failed unexpectedly", work.get("job_id"))

    async def run_job(self, ex: Any, work: TrainWorkMsg) -> None:
        """Run a job from its start step, committing segment by segment."""
        from idlegrid.core.training.spec import JobSpec

        base = f"/api/v1/train/jobs/{work.job_id}/attempts/{work.attempt}"
        loop = asyncio.get_running_loop()
        spec = JobSpec.parse(work.spec)
        ckpt = base64.b64decode(work.checkpoint) if work.checkpoint else None
        if work.world > 1:
            await self._run_gang(ex, work, spec, ckpt)
            return
        try:
            state = await loop.run_in_executor(None, ex.start, spec, ckpt)
            det = await loop.run_in_executor(None, ex.det_class, spec)
        except InvalidRequest as exc:  # e.g. a dataset hash this corpus does not have
            await self.ctx.client.call(
                f"{base}/release", {"reason": exc.message, "kind": "invalid_request"}
            )
            return
        await self._train(ex, work, spec, state, det)

    async def _run_gang(self, ex: Any, work: TrainWorkMsg, spec: Any, ckpt: bytes | None) -> None:
        """One rank of a data-parallel gang: every rank trains, only rank 0 holds the job."""
        loop = asyncio.get_running_loop()
        base = f"/api/v1/train/jobs/{work.job_id}/attempts/{work.attempt}"
        host = self.ctx.config.train_gang_host or "127.0.0.1"
        state = None
        try:
            state = await loop.run_in_executor(
                None,
                ex.start_gang,
                spec,
                ckpt,
                work.rank,
                work.world,
                work.rendezvous,
                f"{work.job_id}/{work.attempt}",
                host,
                self.ctx.config.train_gang_timeout_s,
            )
            det = ex.gang_class(state)
            await self._train(ex, work, spec, state, det)
        except InvalidRequest as exc:  # e.g. a dataset hash this corpus does not have
            if work.rank == 0:
                await self.ctx.client.call(
                    f"{base}/release", {"reason": exc.message, "kind": "invalid_request"}
                )
        except (RuntimeError, ValueError) as exc:
            # A lost or diverged rank (gloo raises RuntimeError on a dead peer or a timeout):
            # the gang's segment fails; the job resumes from its last committed checkpoint.
            log.warning("job %s gang rank %d: %s", work.job_id, work.rank, exc)
            if work.rank == 0:
                with contextlib.suppress(httpx.HTTPError, IdlegridError):
                    await self.ctx.client.call(
                        f"{base}/release", {"reason": f"gang failed: {str(exc)[:200]}"}
                    )
        finally:
            if state is not None:
                ex.leave_gang(state)  # quick: drops the group (see DataParallelTrainer.close)

    async def _train(self, ex: Any, work: TrainWorkMsg, spec: Any, state: Any, det: str) -> None:
        """Train segment by segment from `state`; the holder (rank 0) commits each one."""
        from idlegrid.core.training.proof import TrainingCommitment
        from idlegrid.core.training.spec import segments

        base = f"/api/v1/train/jobs/{work.job_id}/attempts/{work.attempt}"
        run = _Run(base)
        loop = asyncio.get_running_loop()
        holder = work.rank == 0
        if spec.determinism_class is not None and spec.determinism_class != det:
            await self.ctx.client.call(
                f"{base}/release",
                {
                    "reason": (
                        f"this node computes in {det}, the job asks for {spec.determinism_class}"
                    ),
                    "kind": "unsuitable",
                },
            )
            return
        # Only the holder reports progress; another rank's progress would be refused (409).
        uploader = asyncio.create_task(self._upload_progress(run) if holder else asyncio.sleep(1e9))
        began = time.monotonic()
        pending: asyncio.Task[Any] | None = None

        def on_step(leaf: Any, tokens_per_s: float) -> None:
            if run.stop.is_set():
                raise _Stop()
            run.latest = {
                "step": leaf.step + 1,
                "loss": float(leaf.loss),
                "tokens_per_s": float(tokens_per_s),
            }

        try:
            # A segment's commit goes up while the next segment trains (it does not depend on the
            # answer); each commit still waits for the one before it, so they arrive in order.
            async def commit(index: int, c: Any, blob: bytes) -> None:
                await self.ctx.client.call(
                    f"{base}/segments/{index}/commit",
                    {
                        "commitment": base64.b64encode(c.to_bytes()).decode(),
                        "checkpoint": base64.b64encode(blob).decode(),
                        "det_class": det,
                    },
                )
                self.segments += 1

            def stop_on_failure(task: asyncio.Task[Any]) -> None:
                if task.cancelled() or task.exception() is not None:
                    run.stop.set()  # taken away (or unreachable): stop at the next step

            for index, (start, end) in enumerate(segments(spec.steps, spec.checkpoint_interval)):
                if end <= work.start_step:
                    continue
                if self.ctx.draining.is_set():
                    if pending is not None:
                        await pending
                    if holder:  # another rank leaving breaks the gang's next step instead
                        await self.ctx.client.call(
                            f"{base}/release", {"reason": "provider draining"}
                        )
                    return
                t0 = time.perf_counter()
                try:
                    start_hash = await loop.run_in_executor(None, ex.state_hash, spec, state)
                    state, leaves = await loop.run_in_executor(
                        None, ex.run, spec, state, end, on_step
                    )
                except _Stop:
                    if pending is not None:
                        await pending  # raises what stopped us (Conflict: taken away)
                    return
                except RuntimeError:  # a gang's collective failed: keep what was committed
                    if pending is not None:
                        with contextlib.suppress(httpx.HTTPError, IdlegridError):
                            await pending
                    raise
                t1 = time.perf_counter()
                blob = await loop.run_in_executor(None, ex.checkpoint, spec, state)
                if not holder:
                    continue  # the state is rank 0's too (checked at the segment's end)
                c = TrainingCommitment(work.job_id, start, list(leaves), start_hash)
                # Kept for the challenge window: audits and resumes start from these.
                self.checkpoints[(work.job_id, end)] = blob
                if pending is not None:
                    await pending
                # Measured for bench/bench_training_shell.py: training against the time the
                # provider spent on anything else (checkpoint bytes, waiting on a commit).
                self.timing["train_s"] += t1 - t0
                self.timing["commit_s"] += time.perf_counter() - t1
                pending = asyncio.create_task(commit(index, c, blob))
                pending.add_done_callback(stop_on_failure)
            if pending is not None:
                t2 = time.perf_counter()
                await pending
                self.timing["commit_s"] += time.perf_counter() - t2
            log.info("job %s: trained to the end in %.1f s", work.job_id, time.monotonic() - began)
        except Conflict:
            log.info("job %s attempt %d was taken away", work.job_id, work.attempt)
        finally:
            run.stop.set()
            if pending is not None and not pending.done():
                pending.cancel()
            uploader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await uploader

    async def _upload_progress(self, run: _Run) -> None:
        while not run.stop.is_set():
            await asyncio.sleep(PROGRESS_EVERY_S)
            latest = run.latest
            if latest is None or latest == run.sent:
                continue
            try:
                await self.ctx.client.call(f"{run.base}/progress", latest)
                run.sent = latest
            except Conflict:
                run.stop.set()  # the job moved on; the worker stops at its next step
            except (httpx.HTTPError, IdlegridError) as exc:
                log.warning("progress upload failed: %s", exc)

    async def probe_loop(self) -> None:
        """Answer availability probes from the checkpoints kept for the challenge window."""
        missing: set[str] = set()
        while not self.ctx.draining.is_set():
            try:
                got = await self._poll("/api/v1/train/probes/poll", {})
            except (httpx.TransportError, CoordinatorError) as exc:
                log.warning("probe poll failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            except AuthError:
                await asyncio.sleep(0.5)
                continue
            probes = [p for p in (got or {}).get("probes", []) if p["probe_id"] not in missing]
            for p in probes:
                blob = self.checkpoints.get((p["job_id"], p["step"]))
                if blob is None:
                    log.warning(
                        "probe %s: checkpoint %s@%d not kept", p["probe_id"], p["job_id"], p["step"]
                    )
                    missing.add(p["probe_id"])
                    continue
                try:
                    await self.ctx.client.call(
                        f"/api/v1/train/probes/{p['probe_id']}/answer",
                        {"checkpoint": base64.b64encode(blob).decode()},
                    )
                except (httpx.HTTPError, IdlegridError) as exc:
                    log.warning("probe %s: %s", p["probe_id"], exc)
            if len(probes) < len((got or {}).get("probes", [])):
                await asyncio.sleep(1.0)  # only unanswerable ones left: do not spin on them

    async def audit_loop(self) -> None:
        """Take segment audits until the agent drains."""
        ex = executor(self.ctx.config)
        check = self.ctx.config.train_verify or verify_segment
        loop = asyncio.get_running_loop()
        while not self.ctx.draining.is_set():
            try:
                task = await self._poll("/api/v1/train/audits/poll", {})
            except (httpx.TransportError, CoordinatorError) as exc:
                log.warning("training audit poll failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            except AuthError:
                await asyncio.sleep(0.5)
                continue
            if task is None:
                continue
            msg = TrainAuditMsg.model_validate(task)
            try:
                body = await loop.run_in_executor(None, check, ex, msg)
                await self.ctx.client.call(f"/api/v1/train/audits/{msg.audit_id}/report", body)
                self.audited += 1
            except (httpx.HTTPError, IdlegridError) as exc:
                log.warning("training audit %s: %s", msg.audit_id, exc)
            except Exception:
                log.exception("training audit %s failed unexpectedly", msg.audit_id)
