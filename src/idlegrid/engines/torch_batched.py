"""Continuous batching for the torch engine: one model, many sequences, one forward a step.

A `BatchedTorch` serves up to `parallel` sequences on a loaded `TorchEngine`'s model. A
scheduler thread admits new sequences between steps and feeds each its prompt in chunks of
`chunk` tokens on a KV cache of its own (so a long prompt never stalls the others for more
than a chunk); the last chunk's logits give the first token at once. Then the sequence joins
the batch: one KV cache for all rows, left-padded to the longest, with a 2D attention mask
that hides the padding and per-row position ids, so every row keeps its own positions and
sees only its own cells. Each step decodes one token of every row in one forward pass and
samples the rows with the engine's seeded sampler. A sequence that ends, fills its context
or whose consumer leaves is cut out of the batch (the others' rows are untouched); one whose
consumer falls `AHEAD` tokens behind leaves the batch with its own cache and joins again
when the consumer catches up, instead of decoding tokens nobody reads.

Verification needs no record of the batch: the torch audit recomputes an answer in one
prefill and compares within the commitment's tolerance (engines/commit.recompute), and a
batched row is no further from that prefill than a solo decode is (bench/bench_torch_batching
.py; tests/integration/test_batched_torch.py). Padding-free ragged batches would need a
varlen attention kernel that transformers' CPU path does not have; left padding costs the
attention over the padded cells only, and leading columns nobody uses are trimmed whenever
a row leaves. transformers' own continuous batching (`generate_batch`, paged attention)
samples inside its loop and exposes no hidden states, both of which the commitments need.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from idlegrid.engines.base import SamplingParams, check_prompt
from idlegrid.engines.batched import PREFILL_CHUNK
from idlegrid.engines.batching import AHEAD, END, Scheduler, Seq, sample_rows
from idlegrid.engines.commit import Recorder
from idlegrid.engines.steps import Steps
from idlegrid.errors import EngineError

_NAME = "torch"


@dataclass(eq=False)
class _TorchSeq(Seq):
    """A sequence with the KV cache it holds while outside the batch (prefill, parked)."""

    own: Any = None  # transformers DynamicCache of this sequence alone, or None in the batch


class BatchedTorch(Scheduler):
    """One torch model serving up to `parallel` sequences, decoded together."""

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
            thread_name="batched-torch",
        )
        self._torch = engine._torch
        self._n_vocab = len(engine._vocab.tokens)
        self._outside: list[_TorchSeq] = []  # prefilling, or parked behind a slow consumer
        # The batch, touched by the scheduler thread only: rows in cache order, the cache
        # ([rows, kv heads, columns, head dim] per layer) and the [rows, columns] mask.
        self._rows: list[_TorchSeq] = []
        self._cache: Any = None
        self._mask: Any = None

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
        An `urgent` sequence (its consumer streams) gets its prompt chunks first in a turn."""
        ids = list(prompt_ids)
        check_prompt(ids, self.n_ctx_seq, self._n_vocab)
        if params.grammar is not None:
            raise EngineError("the torch engine does not constrain output", engine=_NAME)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = _TorchSeq(ids, params, seed, Steps(ids, params, self._n_vocab), urgent=urgent)
        seq.pos = len(ids) - 1
        return self._submit(seq, recorder, sampler)

    def _run(self) -> None:
        # Inference mode is per thread: held for the scheduler's whole life, never by callers.
        with self._torch.inference_mode():
            self._loop()
        with self._cv:
            for seq in [*self._rows, *self._outside, *self._pending]:
                seq.out.put(EngineError("the batched engine closed", engine=_NAME))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._runnable():
                    self._cv.wait()
                if self._closed:
                    return
                while self._pending and len(self._rows) + len(self._outside) < self.parallel:
                    seq = self._pending.popleft()
                    seq.own = self._new_cache()
                    self._outside.append(seq)
                for seq in [s for s in self._outside if s.cancel.is_set()]:
                    self._outside.remove(seq)
                    seq.out.put(END)
                gone = [s for s in self._rows if s.cancel.is_set()]
                behind = [s for s in self._rows if s.produced - s.taken >= AHEAD and s not in gone]
                # Urgent prompts first: a streamed request's first token waits for no one's chunk.
                prefill = sorted(
                    (s for s in self._outside if s.prefilled < len(s.ids)),
                    key=lambda s: not s.urgent,
                )
                # Parked rows rejoin once their consumer has taken half of what ran ahead.
                back = [
                    s
                    for s in self._outside
                    if s.prefilled == len(s.ids) and s.produced - s.taken <= AHEAD // 2
                ]
            try:
                if gone:
                    self._cut(gone)
                    for seq in gone:
                        seq.out.put(END)
                for seq in behind:
                    self._park(seq)
                for seq in prefill:
                    try:
                        self._prefill_chunk(seq)
                    except Exception as exc:  # this prompt fails alone
                        self._drop_outside(seq, exc)
                        continue
                    if seq.prefilled == len(seq.ids) and seq in self._outside:
                        back.append(seq)
                for seq in back:
                    try:
                        self._join(seq)
                    except Exception as exc:  # it fails alone; the batch is as it was
                        self._drop_outside(seq, exc)
                if self._rows:
                    self._step()
            except Exception as exc:  # every sequence in the batch fails with it
                rows, self._rows, self._cache, self._mask = self._rows, [], None, None
                for seq in rows:
                    seq.out.put(exc)

    def _runnable(self) -> bool:
        if self._pending and len(self._rows) + len(self._outside) < self.parallel:
            return True
        if any(s.cancel.is_set() or s.prefilled < len(s.ids) for s in self._outside):
            return True
        if any(s.produced - s.taken <= AHEAD // 2 for s in self._outside):
            return True
        return any(s.cancel.is_set() or s.produced - s.taken < AHEAD for s in self._rows)

    def _drop_outside(self, seq: _TorchSeq, error: BaseException | None) -> None:
        with self._cv:
            self._outside.remove(seq)
        seq.own = None
        seq.out.put(error if error is not None else END)

    def _emit(self, seq: _TorchSeq, token: int, state: Any) -> bool:
        """Hand a token to the consumer; False once the sequence is over."""
        seq.out.put((token, state, seq.steps.last, None))
        seq.produced += 1
        seq.next_token, seq.pos = token, seq.pos + 1
        return not (self.engine.is_end(token) or seq.pos + 1 >= self.n_ctx_seq)

    # ---- prefill, alone ----------------------------------------------------------------

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        # No config: every layer keeps all its cells (Gemma 3's sliding-window layers
        # too; the mask limits what they see), so a row can be copied into the batch whole.
        return DynamicCache()

    def _prefill_chunk(self, seq: _TorchSeq) -> None:
        """The next `chunk` prompt tokens on the sequence's own cache; after the last one,
        its first token."""
        torch = self._torch
        lo = seq.prefilled
        hi = min(lo + self.chunk, len(seq.ids))
        step = torch.tensor([seq.ids[lo:hi]], dtype=torch.long, device=self.engine._device)
        out = self.engine._model.model(input_ids=step, past_key_values=seq.own, use_cache=True)
        seq.prefilled = hi
        if hi < len(seq.ids):
            return
        state = out.last_hidden_state[0, -1:]
        logits = self.engine._logits(state)[0]
        token = seq.steps.pick(self.engine._pick, logits, seq.seed, seq.pos + 1)
        if not self._emit(seq, token, state[0].float().cpu().numpy()):
            self._drop_outside(seq, None)

    # ---- the batch -----------------------------------------------------------------------

    def _kv(self, cache: Any) -> list[tuple[Any, Any]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _set(self, kv: list[tuple[Any, Any]]) -> None:
        cache = self._new_cache()
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        self._cache = cache

    def _join(self, seq: _TorchSeq) -> None:
        """Add an outside sequence's cache as a new last row, left-padding the shorter side."""
        torch = self._torch
        pad = torch.nn.functional.pad
        own = self._kv(seq.own)
        n = own[0][0].shape[2]
        width = 0 if self._mask is None else self._mask.shape[1]
        cols = max(width, n)
        row = torch.zeros(1, cols, dtype=torch.long, device=self.engine._device)
        row[0, cols - n :] = 1
        kv = []
        batch = self._kv(self._cache) if self._mask is not None else []
        for layer, (k, v) in enumerate(own):
            k, v = pad(k, (0, 0, cols - n, 0)), pad(v, (0, 0, cols - n, 0))
            if batch:
                bk, bv = batch[layer]
                k = torch.cat([pad(bk, (0, 0, cols - width, 0)), k])
                v = torch.cat([pad(bv, (0, 0, cols - width, 0)), v])
            kv.append((k, v))
        if self._mask is not None:
            row = torch.cat([pad(self._mask, (cols - width, 0)), row])
        self._set(kv)
        self._mask = row
        with self._cv:
            self._outside.remove(seq)
            self._rows.append(seq)
        seq.own = None

    def _cut(self, leaving: Sequence[_TorchSeq]) -> None:
        """Take rows out of the batch; drop the leading columns no remaining row uses."""
        torch = self._torch
        with self._cv:
            keep = [r for r, s in enumerate(self._rows) if s not in leaving]
            self._rows = [self._rows[r] for r in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.engine._device)
        mask = self._mask.index_select(0, index)
        # Rows are left-padded with no holes, so the used columns are a suffix.
        lead = int(mask.shape[1] - mask.sum(1).max())
        self._mask = mask[:, lead:]
        self._set(
            [
                (k.index_select(0, index)[:, :, lead:], v.index_select(0, index)[:, :, lead:])
                for k, v in self._kv(self._cache)
            ]  # fmt: skip
        )

    def _park(self, seq: _TorchSeq) -> None:
        """Move a row whose consumer fell behind out of the batch, with its own cache."""
        r = self._rows.index(seq)
        n = int(self._mask[r].sum())
        own = self._new_cache()
        for i, (k, v) in enumerate(self._kv(self._cache)):
            own.update(k[r : r + 1, :, -n:].clone(), v[r : r + 1, :, -n:].clone(), i)
        self._cut([seq])
        seq.own = own
        with self._cv:
            self._outside.append(seq)

    def _step(self) -> None:
        """One forward over every row; sample and hand out each row's token."""
        torch = self._torch
        rows, device = self._rows, self.engine._device
        t0 = time.perf_counter()
        ids = torch.tensor([[s.next_token] for s in rows], dtype=torch.long, device=device)
        pos = torch.tensor([[s.pos] for s in rows], dtype=torch.long, device=device)
        ones = torch.ones(len(rows), 1, dtype=torch.long, device=device)
        mask = torch.cat([self._mask, ones], 1)
        out = self.engine._model.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._mask = mask
        states = out.last_hidden_state[:, -1]
        logits = self.engine._logits(states)
        t1 = time.perf_counter()
        self.decode_s += t1 - t0
        self.step_sizes.append(len(rows))
        tokens = sample_rows(self.engine, rows, list(logits), True)
        host = states.float().cpu().numpy()
        over = [
            s for s, tok, h in zip(rows, tokens, host, strict=True) if not self._emit(s, tok, h)
        ]
        if over:
            self._cut(over)
            for seq in over:
                seq.out.put(END)
        self.sample_s += time.perf_counter() - t1

    def close(self) -> None:
        """Stop the scheduler (pending and active sequences fail); the engine stays loaded."""
        self._stop()
        self._cache = self._mask = None
