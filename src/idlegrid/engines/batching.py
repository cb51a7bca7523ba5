"""What every continuously batching engine shares: a sequence's state, its consumer's side,
the step's sampling, and the slots the agent serves (engines/batched for llama.cpp,
engines/torch_batched for torch; docs/continuous-batching.md)."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from idlegrid.engines.base import SamplingParams
from idlegrid.engines.commit import Recorder
from idlegrid.engines.steps import Steps
from idlegrid.errors import EngineError

AHEAD = 8  # tokens a sequence may run ahead of its consumer before it sits steps out
END = object()  # put on a sequence's queue when it is over


class Batcher(Protocol):
    """A batching engine as its slots see it."""

    engine: Any
    n_ctx_seq: int
    parallel: int
    concurrency: int
    headroom: int
    aggregate_tps: dict[int, float]

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        recorder: Recorder | None = None,
        sampler: Any = None,
        urgent: bool = False,
    ) -> Iterator[int]:
        """One sequence's tokens as the batch produces them."""
        ...

    def close(self) -> None:
        """Stop the batch."""
        ...


@dataclass(eq=False)
class Seq:
    """One generation in the batch: its prompt, sampler state and what it produced."""

    ids: list[int]
    params: SamplingParams
    seed: int
    steps: Steps
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    cancel: threading.Event = field(default_factory=threading.Event)
    sid: int = -1  # llama.cpp: the sequence id (its slot), while admitted
    prefilled: int = 0  # prompt tokens in the cache (llama.cpp: the last one goes in a step)
    pos: int = 0  # position of the next row to decode
    next_token: int = 0
    produced: int = 0
    taken: int = 0  # tokens the consumer has taken (run-ahead is produced - taken)
    urgent: bool = False  # someone waits for its first token (a streaming request)


def consume(
    seq: Seq, cv: threading.Condition, recorder: Recorder | None, sampler: Any
) -> Iterator[int]:
    """A sequence's tokens as its batch produces them, recorded (and its batch shapes, where
    the batch records any); closing the iterator asks the batch to retire it."""
    try:
        while True:
            item = seq.out.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            token, state, lp, shape = item
            if sampler is not None:
                sampler.last = lp
            if recorder is not None:
                recorder.add(token, state, lp)
                if shape is not None:
                    recorder.shapes.append(shape)
            with cv:
                seq.taken += 1
                cv.notify_all()
            yield token
    finally:
        seq.cancel.set()
        with cv:
            cv.notify_all()


def sample_rows(
    engine: Any, ready: Sequence[Seq], logits: Sequence[np.ndarray], vector: bool
) -> list[int]:
    """Each row's token: rows that need only seed, temperature and top_p in one vectorised
    pass (`vector`), the others (penalties, bias, logprobs) one by one."""
    plain = [
        i
        for i, s in enumerate(ready)
        if vector and s.steps.adjust.neutral and s.params.logprobs is None
    ]
    tokens = [0] * len(ready)
    if len(plain) > 1:
        got = engine._pick_rows(
            np.stack([logits[i] for i in plain]),
            [ready[i].seed for i in plain],
            [ready[i].pos + 1 for i in plain],
            [ready[i].params for i in plain],
        )
        for i, tok in zip(plain, got, strict=True):
            tokens[i] = tok
    done = set(plain) if len(plain) > 1 else set()
    for i, s in enumerate(ready):
        if i not in done:
            tokens[i] = s.steps.pick(engine._pick, logits[i], s.seed, s.pos + 1)
    return tokens


class _Last:
    """Where stream_pieces reads the last token's logprobs (`engine.steps.last`)."""

    last: Any = None


class BatchedSlot:
    """One serving slot of a batch: an engine to the agent, one sequence at a time.

    The agent gives each slot its own loop and recorder; generation goes into the shared
    batch. Everything else is the underlying engine's (same model, same determinism
    class). A constrained request (grammar; llama.cpp only) runs unbatched on the engine's
    own context, one at a time, and commits as a plain answer.
    """

    def __init__(self, batched: Batcher) -> None:
        self.batched = batched
        self.engine = batched.engine
        self.name: str = self.engine.name
        self.model_id: str = self.engine.model_id
        self.recorder: Recorder | None = None
        self.steps = _Last()
        self.urgent = False  # set by the agent per task: a consumer streams its answer

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """This slot's sequence in the shared batch, recorded by `recorder` when set."""
        self.steps = _Last()
        if params.grammar is not None:
            return self._constrained(list(prompt_ids), params)
        return self.batched.generate(
            prompt_ids, params, self.recorder, self.steps, urgent=self.urgent
        )

    def _constrained(self, ids: list[int], params: SamplingParams) -> Iterator[int]:
        engine, rec = self.engine, self.recorder
        # The engine's own context, shared with prompt scoring and audits on every slot.
        with self.engine.context_lock:
            engine.recorder = rec
            inner = engine.generate(ids, params)
            try:
                for token in inner:
                    self.steps = engine.steps
                    yield token
            finally:
                inner.close()
                engine.recorder = None
                if rec is not None:  # the deferred first state, while the context holds it
                    rec.finish()

    @property
    def context_length(self) -> int:
        """Tokens per sequence in the batched context."""
        return self.batched.n_ctx_seq

    @property
    def chat_template(self) -> str | None:
        """The model's chat template."""
        template: str | None = self.engine.chat_template
        return template

    def describe(self) -> dict[str, Any]:
        """The engine's facts, with the batch's size and its start-up measurements."""
        b = self.batched
        return {
            **self.engine.describe(),
            "parallel": b.parallel,
            "concurrency": b.concurrency,
            "headroom": b.headroom,
            "aggregate_tps": {str(n): round(t, 2) for n, t in b.aggregate_tps.items()},
        }

    def __getattr__(self, name: str) -> Any:
        # tokenize, detokenize, is_end, det_class, audit, ...: the underlying engine's
        return getattr(self.engine, name)

    def close(self) -> None:
        """Stop the shared batch (the underlying engine stays open for its owner)."""
        self.batched.close()


class Scheduler:
    """The shell both batches share: new sequences queued for one scheduler thread (started
    on first use, running `_run`), the agent's slots, and stopping."""

    def __init__(
        self,
        engine: Any,
        parallel: int,
        *,
        context_per_seq: int | None,
        chunk: int,
        headroom: int,
        thread_name: str,
    ) -> None:
        self.engine = engine
        # `headroom` sequences beyond `parallel` serve interactive work only: the
        # coordinator lets batch lines fill `concurrency` slots, so an interactive request
        # joins the next step instead of waiting for a line to yield (docs/batch.md).
        self.headroom = headroom
        self.parallel = parallel + headroom
        self.concurrency = parallel
        self.chunk = chunk
        self.n_ctx_seq: int = min(context_per_seq or engine.context_length, engine.context_length)
        # The start-up benchmark's aggregate decode tokens/s by sequences, from which the
        # provider's concurrency is chosen (engines/parallel.best_concurrency).
        self.aggregate_tps: dict[int, float] = {}
        self.step_sizes: list[int] = []  # batch size of every decode step (for benchmarks)
        self.decode_s = 0.0  # seconds in batched decodes
        self.sample_s = 0.0  # seconds sampling and handing out rows after them
        self._cv = threading.Condition()
        self._pending: deque[Any] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._thread_name = thread_name

    def _run(self) -> None:
        raise NotImplementedError

    def _submit(
        self, seq: Seq, recorder: Recorder | None, sampler: Any, on_queued: Any = None
    ) -> Iterator[int]:
        """Queue a new sequence for the scheduler and return its tokens; `on_queued` runs
        under the lock once it is queued (llama.cpp pre-empts a decode for urgent work)."""
        with self._cv:
            if self._closed:
                raise EngineError("the batched engine is closed", engine=self.engine.name)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=self._thread_name, daemon=True
                )
                self._thread.start()
            self._pending.append(seq)
            if on_queued is not None:
                on_queued()
            self._cv.notify_all()
        return consume(seq, self._cv, recorder, sampler)

    def slots(self) -> list[BatchedSlot]:
        """One engine per advertised slot for the agent's serving loops, all in this batch."""
        return [BatchedSlot(cast(Batcher, self)) for _ in range(self.concurrency + self.headroom)]

    def _stop(self) -> None:
        """Stop the scheduler thread; sequences still queued or running fail."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
