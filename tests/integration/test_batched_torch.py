"""Continuous batching on the torch engine (engines/torch_batched): one forward a step for
every sequence, each answer as a solo decode would give it and passing the verifier's audit.

Real transformers on gemma3:270m (dequantized, float32): several sequences of different
prompt lengths (one fed in several chunks while the others decode) share a 4-sequence batch
and are consumed from threads. Every sequence draws the tokens the same seed draws decoding
alone, its hidden states are within float noise of the solo decode, and its commitment
passes the audit (one prefill, within the coordinator's same-class tolerance) while the same answer
claimed under another seed does not. A consumer that walks away or falls behind changes no
other sequence's tokens. `idlegrid provide --engine torch` batches by default, sized and
benchmarked as llama.cpp is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from idlegrid.agent.slots import HEADROOM, build_slots, choose_parallel
from idlegrid.coordinator.trust.settings import TrustSettings
from idlegrid.core.trust import commitment as cm
from idlegrid.engines import parallel as par
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.batching import AHEAD, BatchedSlot
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow
pytest.importorskip("torch")
pytest.importorskip("transformers")

from idlegrid.engines.torch_batched import BatchedTorch  # noqa: E402
from idlegrid.engines.torch_hf import TorchEngine  # noqa: E402

PROMPTS = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "Write a short letter to a friend about the weather this week, the rain in Spain and the "
    "long walk you took along the river on Sunday morning.",
    "The capital of France is",
]
TEMPERATURE = 0.8
# The coordinator's tolerance for a verifier of the provider's own class (the tight one).
_TRUST = TrustSettings()
TOL = cm.Tolerance(rel=_TRUST.rel_same, rank_slack=_TRUST.rel_same, margin=_TRUST.margin)
# Batched and solo decodes add the same numbers in other orders (padding, wider matrices):
# measured 3-7e-5 on this model (bench/bench_torch_batching.py); 1e-3 is far from any real
# difference (another seed or quantization moves states by whole units).
STATE_NOISE = 1e-3


@pytest.fixture(scope="module")
def engine() -> Iterator[TorchEngine]:
    e = TorchEngine(DEFAULT_MODEL, threads=2, context_length=256)
    yield e
    e.close()


def _params(i: int) -> SamplingParams:
    return SamplingParams(TEMPERATURE, 1.0, seed=100 + i)


def _solo(engine: TorchEngine, i: int, n: int) -> tuple[list[int], np.ndarray]:
    rec = Recorder()
    engine.recorder = rec
    try:
        it = engine.generate(engine.tokenize(PROMPTS[i]), _params(i))
        tokens = [next(it) for _ in range(n)]
        it.close()
    finally:
        engine.recorder = None
    return tokens, np.stack(rec.states)


def _consume(it: Iterator[int], n: int, out: list[int]) -> None:
    for token in it:
        out.append(token)
        if len(out) >= n:
            break
    it.close()  # type: ignore[attr-defined]


def _run(
    b: BatchedTorch, engine: TorchEngine, jobs: list[tuple[int, int]]
) -> list[tuple[list[int], list[int], Recorder]]:
    """Start every (prompt index, token count) at once, consume each from its own thread."""
    runs, threads = [], []
    for i, n in jobs:
        ids, rec, out = engine.tokenize(PROMPTS[i]), Recorder(), []
        it = b.generate(ids, _params(i), rec)
        threads.append(threading.Thread(target=_consume, args=(it, n, out)))
        runs.append((ids, out, rec))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
        assert not t.is_alive()
    return runs


def test_concurrent_sequences_decode_as_alone_and_pass_the_audit(engine: TorchEngine) -> None:
    b = BatchedTorch(engine, 4, chunk=8, context_per_seq=128)
    try:
        jobs = [(0, 14), (1, 16), (2, 12), (3, 10), (4, 18)]
        runs = _run(b, engine, jobs)
    finally:
        b.close()
    assert max(b.step_sizes) == 4  # four sequences, five requests: one waited for room
    assert min(b.step_sizes) < 4  # rows joined and left between steps
    for (i, n), (ids, tokens, rec) in zip(jobs, runs, strict=True):
        solo_tokens, solo_states = _solo(engine, i, n)
        assert tokens == solo_tokens == rec.tokens, i
        assert np.abs(np.stack(rec.states) - solo_states).max() < STATE_NOISE, i
        assert rec.shapes == []  # nothing for the verifier to replay but the answer
        c = cm.decode(
            build_commitment(engine, DEFAULT_MODEL, ids, rec, 100 + i, TEMPERATURE, 1.0, "length")
            .encode()
        )  # fmt: skip
        verdict = cm.judge(c, engine.audit(ids, c, n), TOL, n)
        assert verdict.passed, verdict.reasons
        # A provider that ignored the seed it was given is caught on the replayed draw.
        lied = build_commitment(engine, DEFAULT_MODEL, ids, rec, 101 + i, TEMPERATURE, 1.0,
                                "length")  # fmt: skip
        assert not cm.judge(lied, engine.audit(ids, lied, n), TOL, n).passed


def test_a_consumer_walking_away_frees_its_room_and_disturbs_no_one(engine: TorchEngine) -> None:
    b = BatchedTorch(engine, 3, chunk=8, context_per_seq=128)
    try:
        # Sequence 0 stops after 2 tokens (a stop string, a cancelled request); the others
        # go on in the same steps, and a sequence started afterwards takes the freed room.
        runs = _run(b, engine, [(0, 2), (1, 12), (2, 12)])
        runs += _run(b, engine, [(4, 8)])
    finally:
        b.close()
    assert [len(t) for _, t, _ in runs] == [2, 12, 12, 8]
    for i, (_, tokens, _) in zip((0, 1, 2, 4), runs, strict=True):
        assert tokens == _solo(engine, i, len(tokens))[0], i


def test_a_consumer_that_falls_behind_sits_out_and_rejoins_unchanged(engine: TorchEngine) -> None:
    b = BatchedTorch(engine, 2, chunk=8, context_per_seq=128)
    try:
        slow = b.generate(engine.tokenize(PROMPTS[0]), _params(0))
        got = [next(slow)]  # admitted, then nobody reads it for a while
        fast: list[int] = []
        _consume(b.generate(engine.tokenize(PROMPTS[1]), _params(1)), 3 * AHEAD, fast)
        seq = next(iter(b._outside), None)
        # The fast sequence ran its 24 tokens; the slow one stopped AHEAD past its reader
        # and left the batch with its own cache instead of decoding tokens nobody took.
        assert seq is not None and seq.produced - seq.taken == AHEAD
        got += [next(slow) for _ in range(2 * AHEAD)]
        slow.close()  # type: ignore[attr-defined]
    finally:
        b.close()
    assert fast == _solo(engine, 1, 3 * AHEAD)[0]
    assert got == _solo(engine, 0, len(got))[0]


def test_an_ended_or_failed_batch_fails_its_consumers_cleanly(engine: TorchEngine) -> None:
    b = BatchedTorch(engine, 2, chunk=8, context_per_seq=32)
    try:
        # A sequence that fills its context ends there, as a solo decode does.
        ids = engine.tokenize(PROMPTS[3])[:20]
        tokens = list(b.generate(ids, _params(3)))
        assert len(ids) + len(tokens) == 32
    finally:
        b.close()
    from idlegrid.errors import EngineError

    with pytest.raises(EngineError, match="closed"):
        b.generate(ids, _params(3))


def test_a_torch_provider_batches_from_the_machine_and_advertises_its_best_concurrency() -> None:
    loaded: list[TorchEngine] = []

    def load() -> TorchEngine:
        loaded.append(TorchEngine(DEFAULT_MODEL, threads=2, context_length=256))
        return loaded[-1]

    built = build_slots(load, bench_tokens=4)
    try:
        engine = loaded[0]
        assert len(loaded) == 1  # one model copy for every slot
        # float32 keys and values, every layer whole (the batch keeps sliding layers whole)
        assert engine.kv_bytes_per_token() == par.kv_bytes_per_token(18, 1, 256, 256, 4)
        expected = choose_parallel(engine, None)
        assert built.parallel == expected >= 2
        assert sorted(built.aggregate_tps) == par.levels(expected)
        assert all(t > 0 for t in built.aggregate_tps.values())
        best = par.best_concurrency(built.aggregate_tps)
        assert len(built.engines) == best + HEADROOM
        assert all(isinstance(e, BatchedSlot) for e in built.engines)
        facts = built.engines[0].describe()
        assert facts["engine"] == "torch" and facts["concurrency"] == best
        assert facts["parallel"] == best + HEADROOM and not facts.get("grammar")
        assert built.decode_tps > 0
    finally:
        built.engines[0].close()
        for e in loaded:
            e.close()


def test_a_prompt_longer_than_the_sliding_window_decodes_as_alone(engine: TorchEngine) -> None:
    # Gemma 3's sliding-window layers see 512 positions. The batch keeps their cells whole
    # and lets the mask cut the window, counted in columns, which match positions only
    # because rows are left-padded and never have holes: a wrong window moves states by
    # whole units, not 1e-4.
    long = TorchEngine(DEFAULT_MODEL, threads=2, context_length=1024)
    try:
        ids = long.tokenize("The history of the printing press begins " * 120)[:700]
        short = long.tokenize(PROMPTS[0])
        b = BatchedTorch(long, 2, chunk=64)
        recs, outs = [Recorder(), Recorder()], [[], []]
        try:
            its = [b.generate(p, _params(k), recs[k]) for k, p in enumerate((ids, short))]
            for _ in range(8):
                for k in (0, 1):
                    outs[k].append(next(its[k]))
            for it in its:
                it.close()  # type: ignore[attr-defined]
        finally:
            b.close()
        long.recorder = solo = Recorder()
        it = long.generate(ids, _params(0))
        assert [next(it) for _ in range(8)] == outs[0]
        it.close()  # type: ignore[attr-defined]
        assert np.abs(np.stack(recs[0].states) - np.stack(solo.states)).max() < STATE_NOISE
        c = build_commitment(long, DEFAULT_MODEL, ids, recs[0], 100, TEMPERATURE, 1.0, "length")
        assert cm.judge(c, long.audit(ids, c, 8), TOL, 8).passed
    finally:
        long.recorder = None
        long.close()
