"""Continuous batching on llama.cpp (engines/batched): many sequences in one decode per step,
each replayed bit for bit from its recorded batch shapes.

Real llama.cpp on gemma3:270m: several sequences are started at once on a 4-slot context (one
prompt long enough to be fed in several chunks while the others decode), consumed from
threads, and each is replayed by a separate 7-slot verifier context on its recorded
(size, row) per step with dummy companions: every hidden state is identical and the seeded
sampler picks every committed token from the replayed logits. Replaying the same answer as
if it had been decoded alone does not match, so the shapes are needed and a provider cannot
claim ones it did not run. A consumer that walks away frees its slot without disturbing
the others, and the slot's next sequence replays exactly too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import sampling
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.batched import BatchedLlama, _Preempted
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.errors import EngineError

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")

PROMPTS = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "Write a short letter to a friend about the weather this week, the rain in Spain and the "
    "long walk you took along the river on Sunday morning.",
    "The capital of France is",
]
TEMPERATURE = 0.8
TOL = cm.Tolerance(rel=1e-4, rank_slack=1e-4, margin=1e-3)  # the coordinator's cross-class one


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=256)
    yield e
    e.close()


@pytest.fixture(scope="module")
def batched(engine: LlamaCppEngine) -> Iterator[BatchedLlama]:
    b = BatchedLlama(engine, 4, chunk=8, context_per_seq=128)
    yield b
    b.close()


@pytest.fixture(scope="module")
def verifier(engine: LlamaCppEngine) -> Iterator[BatchedLlama]:
    b = BatchedLlama(engine, 7, chunk=8, context_per_seq=128)
    yield b
    b.close()


def _consume(it: Iterator[int], n: int, out: list[int]) -> None:
    for token in it:
        out.append(token)
        if len(out) >= n:
            break
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _run(
    b: BatchedLlama, engine: LlamaCppEngine, jobs: list[tuple[int, int]]
) -> list[tuple[list[int], list[int], Recorder]]:
    """Start every (prompt index, token count) at once, consume each from its own thread."""
    runs = []
    threads = []
    for i, n in jobs:
        ids = engine.tokenize(PROMPTS[i])
        rec = Recorder()
        out: list[int] = []
        it = b.generate(ids, SamplingParams(TEMPERATURE, 1.0, seed=100 + i), rec)
        threads.append(threading.Thread(target=_consume, args=(it, n, out)))
        runs.append((ids, out, rec))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
        assert not t.is_alive()
    return runs


def _replay(
    v: BatchedLlama, ids: list[int], tokens: list[int], shapes: list[tuple[int, int]], seed: int
) -> tuple[np.ndarray, list[int]]:
    """Replayed states, and the token the seeded sampler picks from each replayed logits."""
    picks: list[int] = []
    states = v.replay(
        ids,
        tokens,
        shapes,
        lambda k, lg: picks.append(sampling.choose(lg, seed, len(ids) + k, TEMPERATURE, 1.0)),
    )
    return states, picks


def test_concurrent_sequences_replay_bit_for_bit_from_their_recorded_shapes(
    engine: LlamaCppEngine, batched: BatchedLlama, verifier: BatchedLlama
) -> None:
    runs = _run(batched, engine, [(0, 14), (1, 16), (2, 12), (3, 10), (4, 18)])
    assert max(batched.step_sizes) == 4  # four slots, five sequences: one waited for a slot
    grouped = 0
    for i, (ids, tokens, rec) in enumerate(runs):
        assert rec.tokens == tokens and len(rec.shapes) == len(tokens)
        states, picks = _replay(verifier, ids, tokens, rec.shapes, 100 + i)
        assert np.array_equal(states, np.stack(rec.states)), f"sequence {i}"
        assert picks == tokens
        if any(n >= 4 for n, _ in rec.shapes):
            grouped += 1
            solo, _ = _replay(verifier, ids, tokens, [(1, 0)] * len(tokens), 100 + i)
            assert not np.array_equal(solo, np.stack(rec.states)), f"sequence {i}"
    assert grouped >= 1  # some sequence met the four-row kernel, so the shapes mattered


def test_a_consumer_walking_away_frees_its_slot_and_disturbs_no_one(
    engine: LlamaCppEngine, batched: BatchedLlama, verifier: BatchedLlama
) -> None:
    # Sequence 0 stops after 2 tokens (its consumer closes the iterator, as a stop string
    # or a cancelled request does); the others go on in the same steps.
    runs = _run(batched, engine, [(0, 2), (1, 12), (2, 12), (4, 12)])
    assert [len(t) for _, t, _ in runs] == [2, 12, 12, 12]
    # ... and a sequence started afterwards reuses a freed slot
    runs += _run(batched, engine, [(3, 8)])
    for (ids, tokens, rec), seed in zip(runs, (100, 101, 102, 104, 103), strict=True):
        states, picks = _replay(verifier, ids, tokens, rec.shapes[: len(tokens)], seed)
        assert np.array_equal(states, np.stack(rec.states[: len(tokens)]))
        assert picks == tokens


def test_replay_refuses_a_shape_it_cannot_hold(
    engine: LlamaCppEngine, verifier: BatchedLlama
) -> None:
    ids = engine.tokenize(PROMPTS[0])
    with pytest.raises(EngineError, match="batch shape"):
        verifier.replay(ids, [1, 2], [(1, 0), (8, 0)], lambda k, lg: None)


def test_batched_answers_commit_their_schedule_and_pass_an_exact_audit_cheats_do_not(
    engine: LlamaCppEngine, batched: BatchedLlama
) -> None:
    # Through the commitment and the engine's own audit (what a verifier agent runs): the
    # schedule travels in the header, the verifier replays on it, exactly.
    runs = _run(batched, engine, [(0, 12), (1, 12), (2, 12), (4, 12)])
    grouped = 0
    for (ids, tokens, rec), seed in zip(runs, (100, 101, 102, 104), strict=True):
        c = cm.decode(
            build_commitment(
                engine, DEFAULT_MODEL, ids, rec, seed, TEMPERATURE, 1.0, "length"
            ).encode()
        )
        assert c.header.schedule is not None and list(c.header.schedule.shapes) == rec.shapes
        verdict = cm.judge(c, engine.audit(ids, c, len(tokens)), TOL, len(tokens))
        assert verdict.passed and verdict.worst_rel == 0.0, verdict.reasons
        # A provider that ignored the seed it was given is caught on the replayed draw.
        lied = build_commitment(engine, DEFAULT_MODEL, ids, rec, seed + 1, TEMPERATURE, 1.0,
                                "length")  # fmt: skip
        verdict = cm.judge(lied, engine.audit(ids, lied, len(tokens)), TOL, len(tokens))
        assert not verdict.passed
        if any(n >= 4 for n, _ in rec.shapes):
            grouped += 1
            # Claiming it decoded alone (no schedule) does not survive the replay either.
            solo = Recorder(rec.tokens, rec.states, rec.logprobs)
            alone = build_commitment(engine, DEFAULT_MODEL, ids, solo, seed, TEMPERATURE, 1.0,
                                     "length")  # fmt: skip
            assert alone.header.schedule is None
            verdict = cm.judge(alone, engine.audit(ids, alone, len(tokens)), TOL, len(tokens))
            assert not verdict.passed and verdict.worst_rel > TOL.rel
    assert grouped >= 1


def test_a_streamed_sequence_joining_a_busy_batch_gets_its_first_token_alone(
    engine: LlamaCppEngine, batched: BatchedLlama, verifier: BatchedLlama
) -> None:
    # Two sequences nobody waits on token by token (batch lines) keep the batch busy; an
    # urgent one (a streaming request) joins: its first token comes from a step of its own,
    # the rest from the shared steps, and it replays exactly on those shapes.
    started = threading.Event()
    busy: list[list[int]] = [[], []]

    def background(k: int) -> None:
        it = batched.generate(engine.tokenize(PROMPTS[k]), SamplingParams(TEMPERATURE, 1.0, seed=k))
        for token in it:
            busy[k].append(token)
            if len(busy[k]) == 2:
                started.set()
            if len(busy[k]) >= 40:
                break
        it.close()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=background, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    assert started.wait(120)
    ids = engine.tokenize(PROMPTS[2])
    rec, out = Recorder(), []
    it = batched.generate(ids, SamplingParams(TEMPERATURE, 1.0, seed=7), rec, urgent=True)
    _consume(it, 6, out)
    for t in threads:
        t.join(600)
    assert rec.shapes[0] == (1, 0), rec.shapes
    assert any(n > 1 for n, _ in rec.shapes[1:]), rec.shapes  # then it shares the steps
    states, picks = _replay(verifier, ids, out, rec.shapes[: len(out)], 7)
    assert np.array_equal(states, np.stack(rec.states[: len(out)]))
    assert picks == out
    # A sequence nobody waits on joins the shared step directly.
    started.clear()
    busy[:] = [[], []]
    threads = [threading.Thread(target=background, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    assert started.wait(120)
    rec2, out2 = Recorder(), []
    _consume(batched.generate(ids, SamplingParams(TEMPERATURE, 1.0, seed=7), rec2), 3, out2)
    for t in threads:
        t.join(600)
    assert rec2.shapes[0][0] > 1, rec2.shapes


def _idle(b: BatchedLlama) -> None:
    """Wait until the last test's sequences are retired (their consumers closed them)."""
    with b._cv:
        assert b._cv.wait_for(lambda: not b._active and not b._pending, 30)


def _log_decodes(
    b: BatchedLlama,
    monkeypatch: pytest.MonkeyPatch,
    before: Callable[[list[tuple[int, int, int, bool]]], None] = lambda rows: None,
) -> list[str]:
    """Each decode's (slot, position) rows and whether it was aborted, for a failure's
    message; `before` runs on the engine's thread just before each decode."""
    log: list[str] = []
    decode = b._decode

    def logged(rows: list[tuple[int, int, int, bool]]) -> None:
        before(rows)
        try:
            decode(rows)
        except Exception as exc:
            log.append(f"{type(exc).__name__} {[(r[2], r[1]) for r in rows]}")
            raise
        log.append(f"ok {[(r[2], r[1]) for r in rows]}")

    monkeypatch.setattr(b, "_decode", logged)
    return log


def test_a_streamed_arrival_aborts_a_decode_of_batch_lines_which_then_decode_unchanged(
    engine: LlamaCppEngine,
    batched: BatchedLlama,
    verifier: BatchedLlama,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Batch lines fill the decode; a streaming request arriving mid-decode aborts it (its
    # TTFT is then not the rest of the batch's step), and llama.cpp's roll-back of the
    # aborted positions leaves the lines' answers bit for bit replayable.
    started, stop = threading.Event(), threading.Event()
    in_step, arrived = threading.Event(), threading.Event()
    lines: dict[int, tuple[list[int], list[int], Recorder]] = {}

    def hold(rows: list[tuple[int, int, int, bool]]) -> None:
        # A step of the lines alone waits for the arrival, so the arrival finds a decode of
        # batch lines under way on any machine: on a loaded one the lines' consumers lag,
        # the engine idles between steps, and an arrival then had nothing to abort (CI).
        if started.is_set() and not arrived.is_set() and batched._preemptible and rows[0][3]:
            in_step.set()
            arrived.wait(60)

    decodes = _log_decodes(batched, monkeypatch, hold)
    _idle(batched)  # the lines get slots 0 and 1: one ubatch, which an arrival may abort

    def line(k: int) -> None:
        ids, rec, out = engine.tokenize(PROMPTS[k]), Recorder(), []
        it = batched.generate(ids, SamplingParams(TEMPERATURE, 1.0, seed=k), rec)
        for token in it:
            out.append(token)
            if len(out) == 2:
                started.set()
            if len(out) >= 100 or stop.is_set():
                break
        it.close()  # type: ignore[attr-defined]
        lines[k] = (ids, out, rec)

    threads = [threading.Thread(target=line, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    assert started.wait(120)
    assert in_step.wait(120)
    before = batched.preempted
    ids, rec, out, seed = engine.tokenize(PROMPTS[4]), Recorder(), [], 50
    it = batched.generate(ids, SamplingParams(TEMPERATURE, 1.0, seed=seed), rec, urgent=True)
    arrived.set()
    _consume(it, 1, out)
    stop.set()
    for t in threads:
        t.join(600)
    assert batched.preempted == before + 1, decodes
    assert rec.shapes[0] == (1, 0)
    states, picks = _replay(verifier, ids, out, rec.shapes[:1], seed)
    assert np.array_equal(states, np.stack(rec.states[:1])) and picks == out
    for k, (lids, out, rec) in lines.items():
        states, picks = _replay(verifier, lids, out, rec.shapes[: len(out)], k)
        got = np.stack(rec.states[: len(out)])
        rows = [i for i in range(len(out)) if not np.array_equal(states[i], got[i])]
        assert not rows, f"line {k}: rows {rows} of shapes {rec.shapes[: len(out)]}; {decodes}"
        assert picks == out, f"line {k}"


@pytest.mark.parametrize("compact", [False, True], ids=["hole-kept", "hole-closed"])
def test_a_step_with_a_hole_in_its_slots_records_the_ubatches_llama_cpp_runs(
    engine: LlamaCppEngine, compact: bool
) -> None:
    # Slots 0..5 busy, then slot 1's consumer leaves. Kept (a sequence sitting out its
    # run-ahead leaves such a hole too): llama.cpp decodes slots 0 and 2-5 as two ubatches
    # (one KV stream per sequence needs consecutive ids), so slot 5 is rank 3 of a group of
    # four (the grouped kernel), not row 4 of five (the one-row kernel). Closed: slot 5's
    # sequence moves to slot 1 (its stream copied), row 1 of five from then on; either
    # way every sequence replays bit for bit on what it recorded.
    b = BatchedLlama(engine, 6, chunk=8, context_per_seq=64)
    b.compact = compact
    v = BatchedLlama(engine, 11, chunk=8, context_per_seq=64)
    try:
        prompts = [engine.tokenize(PROMPTS[k % 3]) for k in range(6)]
        recs = [Recorder() for _ in range(6)]
        its = [
            b.generate(ids, SamplingParams(TEMPERATURE, 1.0, seed=k), rec)
            for k, (ids, rec) in enumerate(zip(prompts, recs, strict=True))
        ]
        outs: list[list[int]] = [[] for _ in range(6)]
        for _ in range(2):  # in step: all six admitted, in slot order
            for k, it in enumerate(its):
                outs[k].append(next(it))
        its[1].close()  # type: ignore[attr-defined]
        for _ in range(6):
            for k in (0, 2, 3, 4, 5):
                outs[k].append(next(its[k]))
        for k in (0, 2, 3, 4, 5):
            its[k].close()  # type: ignore[attr-defined]
        if compact:  # one step of five rows
            assert b.moves == 1 and recs[5].shapes[-1] == (5, 1), recs[5].shapes
            assert recs[0].shapes[-1] == (5, 0) and (6, 5) in recs[5].shapes
        else:  # a ubatch of one and one of four
            assert recs[5].shapes[-1] == (4, 3) and recs[0].shapes[-1] == (1, 0), recs[5].shapes
        for k in (0, 2, 5):
            states, picks = _replay(v, prompts[k], outs[k], recs[k].shapes[: len(outs[k])], k)
            assert np.array_equal(states, np.stack(recs[k].states[: len(outs[k])])), k
            assert picks == outs[k]
    finally:
        b.close()
        v.close()


def test_an_abort_in_a_gapped_steps_second_ubatch_leaves_no_position_of_the_first(
    engine: LlamaCppEngine,
) -> None:
    # Slots 0 and 2 decode as two ubatches. llama.cpp takes only the aborted ubatch's
    # positions out of the cache (llama.h: processed ubatches remain), so an abort in the
    # second left slot 0's row in, and the re-decode next turn put that position in twice.
    import llama_cpp

    b = BatchedLlama(engine, 4, chunk=8, context_per_seq=64)
    lib, calls, abort_after = b._lib, [0], [10**9]

    @llama_cpp.ggml_abort_callback  # type: ignore[misc]
    def counting(_: object) -> bool:
        calls[0] += 1
        return calls[0] > abort_after[0]

    try:
        lib.llama_set_abort_callback(b._ctx, counting, None)
        ids = engine.tokenize(PROMPTS[0])
        for sid in (0, 2, 3):
            b._decode([(t, p, sid, False) for p, t in enumerate(ids[:-1])])
        calls[0] = 0
        b._embeddings(True)
        b._decode([(ids[-1], len(ids) - 1, 3, True)])  # one ubatch of one row: its calls
        per_ubatch, alone = calls[0], b._row(0)[0]
        calls[0], abort_after[0] = 0, per_ubatch + per_ubatch // 2  # mid second ubatch
        with pytest.raises(_Preempted):
            b._decode([(ids[-1], len(ids) - 1, sid, True) for sid in (0, 2)])
        assert per_ubatch < calls[0] <= 2 * per_ubatch
        for sid in (0, 2):
            assert lib.llama_memory_seq_pos_max(b._mem, sid) == len(ids) - 2, sid
        # Decoded again next turn, slot 0 (alone in its ubatch) gives what slot 3 gave alone.
        abort_after[0] = 10**9
        b._decode([(ids[-1], len(ids) - 1, sid, True) for sid in (0, 2)])
        assert np.array_equal(b._row(0)[0], alone)
    finally:
        b.close()


def test_an_arrival_does_not_abort_a_gapped_step(
    engine: LlamaCppEngine,
    batched: BatchedLlama,
    verifier: BatchedLlama,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lines in slots 0 and 2 decode as two ubatches; an abort in the first changed how the
    # second's sequence decoded next (not bit for bit), so a gapped step runs to its end
    # and the arrival waits for it. (Holes left by a consumer are closed by moving the
    # sequence above down; this one is kept, as one left by a sequence sitting out is.)
    monkeypatch.setattr(batched, "compact", False)
    _idle(batched)
    in_step, arrived = threading.Event(), threading.Event()
    gapped = threading.Event()

    def hold(rows: list[tuple[int, int, int, bool]]) -> None:
        if gapped.is_set() and not arrived.is_set() and [r[2] for r in rows] == [0, 2]:
            in_step.set()
            arrived.wait(60)

    decodes = _log_decodes(batched, monkeypatch, hold)
    ids = [engine.tokenize(PROMPTS[k]) for k in (0, 1, 2)]
    recs = [Recorder() for _ in range(3)]
    its = [
        batched.generate(ids[k], SamplingParams(TEMPERATURE, 1.0, seed=k), recs[k])
        for k in range(3)
    ]
    outs: list[list[int]] = [[next(it)] for it in its]  # all three admitted: slots 0, 1, 2
    its[1].close()  # type: ignore[attr-defined]
    gapped.set()
    stop = threading.Event()

    def line(k: int) -> None:
        for token in its[k]:
            outs[k].append(token)
            if len(outs[k]) >= 60 or stop.is_set():
                break
        its[k].close()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=line, args=(k,)) for k in (0, 2)]
    for t in threads:
        t.start()
    assert in_step.wait(120), decodes
    before = batched.preempted
    rec, out = Recorder(), []
    it = batched.generate(
        engine.tokenize(PROMPTS[4]), SamplingParams(TEMPERATURE, 1.0, seed=7), rec, urgent=True
    )
    arrived.set()
    _consume(it, 1, out)
    stop.set()
    for t in threads:
        t.join(600)
    assert batched.preempted == before, decodes
    for k in (0, 2):
        n = len(outs[k])
        states, picks = _replay(verifier, ids[k], outs[k], recs[k].shapes[:n], k)
        assert np.array_equal(states, np.stack(recs[k].states[:n])), (k, decodes)
        assert picks == outs[k]
