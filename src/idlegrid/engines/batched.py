"""Continuous batching for the llama.cpp engine: one context, many sequences, one decode a step.

A `BatchedLlama` owns one llama.cpp context with `parallel` sequence slots over a loaded
`LlamaCppEngine`'s model. A scheduler thread admits new sequences between steps, feeds at
most one prompt chunk (`chunk` tokens, one sequence) per step so that a long prompt never
stalls the others, then decodes one token of every sequence that is past its prompt in a
single `llama_decode`, samples each row with the engine's seeded sampler, and retires
sequences that ended or whose consumer went away (`generate`'s iterator closed).

Verification (docs/continuous-batching.md, measured by bench/bench_batched_decode.py): with
one KV stream per sequence (`kv_unified` off), a sequence's hidden states and logits in a
batched step do not depend on the other sequences' contents, only on the batch's shape
(its size and the sequence's row: llama.cpp's repacked Q4_K kernels multiply rows in groups
of four, and leftover rows take the one-row kernel, bit-identical to decoding alone). So
each step of a sequence records its `(size, row)`, the prompt goes in fixed chunks of
`chunk` tokens on its own, and `replay` recomputes a sequence bit for bit by decoding it at
the recorded row of a batch of the recorded size, the other rows dummy sequences.
"""

from __future__ import annotations

import ctypes
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from idlegrid.engines.base import SamplingParams, check_prompt
from idlegrid.engines.batching import AHEAD, END, Scheduler, Seq, sample_rows
from idlegrid.engines.commit import Recorder
from idlegrid.engines.steps import Steps
from idlegrid.errors import EngineError

PREFILL_CHUNK = 64  # prompt tokens per step; part of what a verifier replays


class _Preempted(Exception):
    """A decode aborted for urgent work; its rows' positions are out of the cache again."""


def _flag_callback() -> Any:
    """An abort callback that is true while byte 0 of its data is set, callable without the
    GIL: libc's `strlen` over a 2-byte buffer (non-zero iff byte 0 is). ggml's thread 0 calls
    it after every graph node; a Python callback there would take the GIL hundreds of times
    a step, each take a wait behind the serving threads."""
    import llama_cpp

    address = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value
    if address is None:
        raise EngineError("libc's strlen has no address", engine="llama.cpp")
    return llama_cpp.ggml_abort_callback(address)


def _sid(seq: Seq) -> int:
    return seq.sid


def _shapes(sids: Sequence[int]) -> list[tuple[int, int]]:
    """Each row's (ubatch size, rank in it) for a step over these ascending slots.

    With one KV stream per sequence llama.cpp splits a batch into ubatches of consecutive
    sequence ids (`split_equal`, sequential): slots 0, 1, 3 decode as a ubatch of two and
    one alone. A row's numbers follow its ubatch, so that is the shape a verifier replays
    (recording the whole step's width instead made gapped steps replay inexactly, measured).
    """
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(sids) + 1):
        if i == len(sids) or sids[i] != sids[i - 1] + 1:
            out += [(i - start, r) for r in range(i - start)]
            start = i
    return out


class BatchedLlama(Scheduler):
    """One llama.cpp context serving up to `parallel` sequences, decoded together."""

    def __init__(
        self,
        engine: Any,
        parallel: int,
        *,
        context_per_seq: int | None = None,
        chunk: int = PREFILL_CHUNK,
        headroom: int = 0,
    ) -> None:
        super().__init__(
            engine,
            parallel,
            context_per_seq=context_per_seq,
            chunk=chunk,
            headroom=headroom,
            thread_name="batched-llama",
        )
        lib = self._lib = engine._lib
        parallel = self.parallel
        params = lib.llama_context_default_params()
        src = engine._llm.context_params
        for name, _ in params._fields_:
            setattr(params, name, getattr(src, name))
        params.n_seq_max = parallel
        params.n_ctx = self.n_ctx_seq * parallel
        params.n_batch = params.n_ubatch = max(chunk, parallel)
        # One KV stream per sequence: a sequence's numbers then do not depend on what the
        # others hold (with one unified cache they do, measured up to 5e-2).
        params.kv_unified = False
        params.embeddings = False
        self._ctx = lib.llama_init_from_model(engine._llm.model, params)
        if not self._ctx:
            raise EngineError("llama.cpp could not make a batched context", engine=engine.name)
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(max(chunk, parallel), 0, 1)
        self._embeddings_on = False
        # Pre-emption: a streaming request that arrives while a turn decodes only work nobody
        # waits on token by token (batch lines) aborts that decode, so its time to first
        # token is not the rest of a wide step. The aborted step's positions leave the cache
        # (`_decode`), and the rows decode again next turn with the same shape into the same
        # cells: bit for bit what they would have been (tested).
        self._abort_flag = ctypes.create_string_buffer(2)
        self._abort_cb = _flag_callback()  # referenced here: llama.cpp keeps only the pointer
        lib.llama_set_abort_callback(
            self._ctx, self._abort_cb, ctypes.cast(self._abort_flag, ctypes.c_void_p)
        )
        self._preemptible = False  # the turn under way holds no urgent row
        # Off: urgent work waits for the decode under way (bench_batch.py --preempt on,off).
        self.preempt = os.environ.get("IDLEGRID_PREEMPT", "1") != "0"
        self.preempted = 0  # decodes aborted for urgent work (for benchmarks and tests)
        # Close holes below running sequences by moving them down (`_compact`); off only
        # for tests of gapped steps.
        self.compact = True
        self.moves = 0  # sequences moved to a lower slot
        self._n_vocab: int = engine._n_vocab
        self._n_embd: int = engine._n_embd
        self._active: list[Seq] = []
        self._free = list(range(parallel - 1, -1, -1))
        self._replaying = threading.Lock()
        # Sample a step's plain rows in one pass (core/trust/batch_sampling); False: one by
        # one, as before (bench/bench_batch_sampling.py compares the two).
        self.vector = hasattr(engine, "_pick_rows")
        # Prompts that get a chunk each loop turn (1: the earlier one-chunk-a-turn rule).
        self.prefill_per_turn = parallel

    # ---- serving -------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        recorder: Recorder | None = None,
        sampler: Any = None,
        urgent: bool = False,
    ) -> Iterator[int]:
        """Tokens of one sequence as the batch produces them; closing the iterator retires it.
        `urgent`: someone waits for its first token, which then does not wait for a step of
        work nobody waits for (see `_loop`).

        With `recorder`, each token taken is recorded with its hidden state, logprobs and the
        step's (size, row) in `recorder.shapes`; `sampler.last` gets each token's logprobs.
        """
        ids = list(prompt_ids)
        check_prompt(ids, self.n_ctx_seq, self._n_vocab)
        if recorder is not None:
            recorder.chunk = self.chunk
        if params.grammar is not None:
            raise EngineError("the batched path does not constrain output", engine="llama.cpp")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Seq(ids, params, seed, Steps(ids, params, self._n_vocab), urgent=urgent)
        seq.next_token, seq.pos = ids[-1], len(ids) - 1

        def preempt() -> None:
            if urgent and self._preemptible and self.preempt:
                self._abort_flag[0] = b"\x01"

        return self._submit(seq, recorder, sampler, preempt)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._runnable():
                    self._cv.wait()
                if self._closed:
                    break
                while self._pending and self._free:
                    seq = self._pending.popleft()
                    # The lowest free slot: holes close first, and a step's slots stay one
                    # consecutive run (one ubatch, see `_shapes`) as often as they can.
                    seq.sid = min(self._free)
                    self._free.remove(seq.sid)
                    self._active.append(seq)
                for seq in [s for s in self._active if s.cancel.is_set()]:
                    self._retire(seq, None)
                if self.compact:
                    self._compact()
                # Rows in slot order: the recorded row is then the slot's rank in the step.
                ready = sorted(
                    (
                        s
                        for s in self._active
                        if s.prefilled >= len(s.ids) - 1 and s.produced - s.taken < AHEAD
                    ),
                    key=lambda s: s.sid,
                )
                # One chunk of every waiting prompt per turn (each alone in its decode, so
                # its numbers do not depend on the turn): 8 requests arriving together then
                # all join the next step, where one chunk a turn made the 8th wait 8 turns
                # (TTFT past the coordinator's stall timeout on a loaded box, measured).
                prefill = [s for s in self._active if s.prefilled < len(s.ids) - 1]
                # Urgent work first: while a sequence someone waits on (a streaming request)
                # has no first token yet and sequences nobody waits on token by token (batch
                # lines) share the batch, a turn runs only the urgent prompts' chunks and
                # first tokens, the latter alone (a width-1 step is a third of a width-8 one
                # here). Its TTFT is then its own prefill and one small step, not the batch's
                # prefills and steps as well. Among urgent sequences nothing changes.
                waiting = {id(s) for s in self._active if s.urgent and s.produced == 0}
                urgent_turn = bool(waiting) and any(not s.urgent for s in self._active)
                if urgent_turn:
                    prefill = [s for s in prefill if s.urgent]
                    ready = [s for s in ready if id(s) in waiting]
                prefill = prefill[: self.prefill_per_turn]
                self._abort_flag[0] = b"\x00"
                # Only a step of one ubatch (consecutive slots): after an abort in a gapped
                # step's first ubatch, a sequence of a later one (which never ran, and has
                # no position to take out) decodes its next row differently from a replay
                # (measured, in a solo step too): llama.cpp planned that ubatch's cells too.
                self._preemptible = not any(s.urgent for s in [*prefill, *ready]) and (
                    not ready or ready[-1].sid - ready[0].sid == len(ready) - 1
                )
            with self._replaying:
                try:
                    for seq in prefill:
                        self._prefill_chunk(seq, seq.sid)
                    if urgent_turn:  # a prompt that just finished takes its first token now
                        done = [s for s in prefill if s.prefilled >= len(s.ids) - 1]
                        ready = sorted({s.sid: s for s in [*ready, *done]}.values(), key=_sid)
                    if ready:
                        self._step(ready)
                except _Preempted:  # the urgent newcomer goes first; these rows next turn
                    self.preempted += 1
                except Exception as exc:  # every sequence in the batch fails with it
                    with self._cv:
                        for seq in list(self._active):
                            self._retire(seq, exc)
                finally:
                    with self._cv:
                        self._preemptible = False
        with self._cv:
            for seq in [*self._active, *self._pending]:
                seq.out.put(EngineError("the batched engine closed", engine="llama.cpp"))

    def _runnable(self) -> bool:
        if self._pending and self._free:
            return True
        return any(
            s.cancel.is_set() or s.prefilled < len(s.ids) - 1 or s.produced - s.taken < AHEAD
            for s in self._active
        )

    def _compact(self) -> None:
        """Move the sequences in the highest slots down into free slots below them (under
        the condition's lock, between decodes).

        llama.cpp decodes a step as ubatches of consecutive slots, and rows in a ubatch of
        fewer than four take the one-row kernel: with holes, steps of 4-8 rows ran as small
        ubatches no faster than decoding alone (slots 1, 3, 4, 5: 79 tok/s; 0-3: 126). A
        cross-stream `llama_memory_seq_cp` copies the stream's cells and K/V bytes whole (at
        the next decode, before its batch), so the sequence goes on bit for bit from its new
        slot, and its later steps record the shapes they then run in."""
        while self._free and self._active:
            low = min(self._free)
            seq = max(self._active, key=_sid)
            if low > seq.sid:
                return
            self._lib.llama_memory_seq_cp(self._mem, seq.sid, low, -1, -1)
            self._lib.llama_memory_seq_rm(self._mem, seq.sid, -1, -1)
            self._free.remove(low)
            self._free.append(seq.sid)
            seq.sid = low
            self.moves += 1

    def _retire(self, seq: Seq, error: BaseException | None) -> None:
        """Free the slot and its cache (under the condition's lock)."""
        self._active.remove(seq)
        self._lib.llama_memory_seq_rm(self._mem, seq.sid, -1, -1)
        self._free.append(seq.sid)
        seq.out.put(error if error is not None else END)

    def _prefill_chunk(self, seq: Seq, sid: int) -> None:
        """The next `chunk` prompt tokens of one sequence, alone in their decode."""
        lo = seq.prefilled
        hi = min(lo + self.chunk, len(seq.ids) - 1)
        self._embeddings(False)
        self._decode([(seq.ids[p], p, sid, False) for p in range(lo, hi)])
        seq.prefilled = hi

    def _step(self, ready: list[Seq]) -> None:
        """One decode over every ready sequence; sample and hand out each row's token."""
        self._embeddings(True)
        t0 = time.perf_counter()
        self._decode([(s.next_token, s.pos, s.sid, True) for s in ready])
        t1 = time.perf_counter()
        self.decode_s += t1 - t0
        n = len(ready)
        self.step_sizes.append(n)
        shapes = _shapes([s.sid for s in ready])
        rows = [self._row(row) for row in range(n)]
        tokens = sample_rows(self.engine, ready, [lg for _, lg in rows], self.vector)
        for row, s in enumerate(ready):
            state = rows[row][0]
            token = tokens[row]
            s.out.put((token, state, s.steps.last, shapes[row]))
            s.produced += 1
            s.next_token, s.pos = token, s.pos + 1
            if self.engine.is_end(token) or s.pos + 1 >= self.n_ctx_seq:
                with self._cv:
                    self._retire(s, None)
        self.sample_s += time.perf_counter() - t1

    # ---- replay (verifier) ------------------------------------------------------------

    def replay(
        self,
        context_ids: Sequence[int],
        tokens: Sequence[int],
        shapes: Sequence[tuple[int, int]],
        on_logits: Callable[[int, np.ndarray], None],
    ) -> np.ndarray:
        """Hidden states of each committed position, on the provider's batch shapes.

        The context (but its last token) in chunks of `chunk`, alone; then step k decodes
        the sequence at row `shapes[k][1]` of a batch of `shapes[k][0]` rows, the others
        dummy sequences (their contents do not change its numbers, only the shape does).
        Must not run while this instance serves.
        """
        ids = list(context_ids)
        check_prompt(ids, self.n_ctx_seq, self._n_vocab)
        if len(shapes) != len(tokens):
            raise EngineError("one batch shape per committed token", engine="llama.cpp")
        # The sequence sits in the middle slot; dummies in the slots below and above it
        # give it the recorded rank (rows go in slot order), so 2P-1 slots replay P.
        home = (self.parallel - 1) // 2
        if any(
            not (0 <= r < n and r <= home and n - 1 - r < self.parallel - home) for n, r in shapes
        ):
            raise EngineError("batch shape out of range", engine="llama.cpp")
        if len(ids) + len(tokens) > self.n_ctx_seq:
            raise EngineError("commitment longer than the context", engine="llama.cpp")
        with self._cv:  # sequences whose consumers left are retired by the next loop turn
            if not self._cv.wait_for(lambda: not self._active and not self._pending, 30.0):
                raise EngineError("replay while serving", engine="llama.cpp")
        with self._replaying, self._cv:
            self._abort_flag[0] = b"\x00"
            self._lib.llama_memory_clear(self._mem, True)
            seq = Seq(ids, SamplingParams(), 0, Steps(ids, SamplingParams()))
            while seq.prefilled < len(ids) - 1:
                self._prefill_chunk(seq, home)
            states = np.empty((len(tokens), self._n_embd), dtype=np.float32)
            inputs = [ids[-1], *tokens[:-1]]
            self._embeddings(True)
            dpos = [0] * self.parallel  # each dummy's next position
            for k, ((n, row), tok) in enumerate(zip(shapes, inputs, strict=True)):
                rows = []
                for sid in range(home - row, home - row + n):
                    if sid == home:
                        rows.append((tok, len(ids) - 1 + k, sid, True))
                    else:
                        rows.append((0, dpos[sid], sid, True))
                        dpos[sid] += 1
                self._decode(rows)
                state, logits = self._row(row)
                states[k] = state
                on_logits(k, logits)
            self._lib.llama_memory_clear(self._mem, True)
            return states

    # ---- llama.cpp ---------------------------------------------------------------------

    def _decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> None:
        b = self._batch
        for i, (tok, pos, sid, out) in enumerate(rows):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = sid
            b.logits[i] = out
        b.n_tokens = len(rows)
        rc = self._lib.llama_decode(self._ctx, b)
        if rc == 2:  # aborted by the flag
            # llama.cpp takes only the aborted ubatch's positions out of the cache; a gapped
            # step's earlier ubatches stay (llama.h), and decoding their rows again next
            # turn put each position in twice: those rows then replayed inexactly.
            for _, pos, sid, _ in rows:
                self._lib.llama_memory_seq_rm(self._mem, sid, pos, -1)
            raise _Preempted()
        if rc != 0:
            raise EngineError(f"llama_decode returned {rc}", engine="llama.cpp")

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Output row i's hidden state (a copy) and logits (a view until the next decode)."""
        lib = self._lib
        e = lib.llama_get_embeddings_ith(self._ctx, i)
        if not e:
            raise EngineError("llama.cpp returned no hidden state", engine="llama.cpp")
        lg = lib.llama_get_logits_ith(self._ctx, i)
        return (
            np.ctypeslib.as_array(e, shape=(self._n_embd,)).copy(),
            np.ctypeslib.as_array(lg, shape=(self._n_vocab,)),
        )

    def _embeddings(self, on: bool) -> None:
        if on != self._embeddings_on:
            self._lib.llama_set_embeddings(self._ctx, on)
            self._embeddings_on = on

    def close(self) -> None:
        """Stop the scheduler (pending and active sequences fail) and free the context."""
        self._stop()
        with self._replaying:
            if self._ctx:
                self._lib.llama_batch_free(self._batch)
                self._lib.llama_free(self._ctx)
                self._ctx = None
