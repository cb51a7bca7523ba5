"""The supervisors' decisions, pure: training jobs (`core/training/lifecycle.py`) and
inference tasks (`core/tasks.py`), each rule on a snapshot of plain dataclasses."""

from __future__ import annotations

from idlegrid.core import tasks as t
from idlegrid.core.training import lifecycle as life

LIMITS = life.TickLimits(
    queue_ttl_s=3600, lease_timeout_s=60, challenge_s=30, audit_timeout_s=300, probe_timeout_s=30
)
NOW = 10_000.0


def job(
    state: str = "running",
    node: str | None = "p1",
    verified: int = 0,
    steps: int = 30,
    lease_at: float = NOW - 1,
    created_at: float = NOW - 100,
    segments: tuple[life.SegmentSnap, ...] = (),
) -> life.JobSnap:
    return life.JobSnap("j1", state, node, created_at, lease_at, verified, steps, 5, segments)


def seg(i: int, audit: str | None = None, created_at: float = NOW - 100) -> life.SegmentSnap:
    return life.SegmentSnap(
        f"j1:{i}:1", 10 * i, 10 * i + 10, created_at, f"taud-{i}" if audit else None, audit
    )


def decide(j: life.JobSnap, live: frozenset[str] = frozenset({"p1"})) -> list[life.Action]:
    return life.decide_job(j, live, NOW, LIMITS)


# ---- training -------------------------------------------------------------------------------


def test_segments_are_accepted_in_order_and_the_job_finishes() -> None:
    j = job(state="trained", node=None, segments=(seg(0, "passed"), seg(1), seg(2, "passed")))
    acts = decide(j)
    assert acts == [
        life.Accept("j1", "j1:0:1", 50, "audit:taud-0", "taud-0", 10),
        life.Accept("j1", "j1:1:1", 50, "challenge window passed", None, 20),
        life.Accept("j1", "j1:2:1", 50, "audit:taud-2", "taud-2", 30),
        life.Finish("j1"),
    ]


def test_acceptance_stops_at_a_gap_in_the_steps() -> None:
    assert decide(job(segments=(seg(1),))) == []
    assert decide(job(segments=(seg(0), seg(2)))) == [
        life.Accept("j1", "j1:0:1", 50, "challenge window passed", None, 10)
    ]


def test_acceptance_stops_at_the_first_audit_not_passed() -> None:
    for state in ("pending", "assigned", "failed", "dropped"):
        acts = decide(job(segments=(seg(0, "passed"), seg(1, state), seg(2, "passed"))))
        assert [a.segment_id for a in acts if isinstance(a, life.Accept)] == ["j1:0:1"], state


def test_acceptance_stops_at_an_open_challenge_window() -> None:
    fresh = seg(1, created_at=NOW - LIMITS.challenge_s + 1)
    acts = decide(job(segments=(seg(0), fresh, seg(2))))
    assert [a.segment_id for a in acts if isinstance(a, life.Accept)] == ["j1:0:1"]
    # An audited segment does not wait for its window: its audit decides.
    audited = seg(1, "passed", created_at=NOW)
    assert len(decide(job(segments=(seg(0), audited)))) == 2


def test_a_lost_holder_requeues_the_job_and_its_final_segments_are_still_accepted() -> None:
    acts = decide(job(segments=(seg(0),)), live=frozenset())
    assert acts == [
        life.Requeue("j1", "provider-lost", "p1"),
        life.Accept("j1", "j1:0:1", 50, "challenge window passed", None, 10),
    ]


def test_a_stalled_holder_requeues_the_job() -> None:
    acts = decide(job(lease_at=NOW - LIMITS.lease_timeout_s - 1))
    assert acts == [life.Requeue("j1", "provider-stalled", "p1")]
    assert decide(job(lease_at=NOW - LIMITS.lease_timeout_s)) == []  # not yet
    assert decide(job(state="trained", node=None), live=frozenset()) == []  # nobody holds it


def test_a_job_queued_past_its_ttl_expires_and_nothing_else_happens() -> None:
    old = NOW - LIMITS.queue_ttl_s - 1
    acts = decide(job(state="queued", node=None, created_at=old, lease_at=old, segments=(seg(0),)))
    assert acts == [life.Expire("j1", "queued over 3600 s")]
    # A job taken back recently waits from then on.
    assert decide(job(state="queued", node=None, created_at=old, lease_at=NOW - 5)) == []


def test_silent_verifiers_lose_their_audits_and_unanswered_probes_fail() -> None:
    acts = life.decide_timeouts(
        [life.AssignedAudit("a-old", NOW - 301), life.AssignedAudit("a-new", NOW - 299)],
        [life.PendingProbe("p-old", NOW - 31), life.PendingProbe("p-new", NOW - 29)],
        NOW,
        LIMITS,
    )
    assert acts == [life.Reassign("a-old"), life.FailProbe("p-old", "not answered within 30 s")]


def test_decide_jobs_runs_each_job_in_order() -> None:
    a = job(segments=(seg(0),))
    b = life.JobSnap("j2", "running", "gone", NOW, NOW, 0, 10, 1, ())
    acts = life.decide_jobs([a, b], frozenset({"p1"}), NOW, LIMITS)
    assert [type(x).__name__ for x in acts] == ["Accept", "Requeue"]


# ---- inference ------------------------------------------------------------------------------

SL = t.SuperviseLimits(node_timeout_s=15, stall_timeout_s=60, queue_timeout_s=120)


def running(
    stream: t.StreamSnap | None = None, seen: float | None = NOW - 1, attempt: int = 1
) -> t.RunningSnap:
    if stream is None:
        stream = t.StreamSnap(attempt, "p1", NOW - 1)
    return t.RunningSnap("t1", attempt, "p1", stream, seen)


def test_inference_all_well_means_no_action() -> None:
    assert t.supervise_running(running(), frozenset(), NOW, SL) == []


def test_inference_consumer_gone_fails_the_task() -> None:
    snap = t.RunningSnap("t1", 1, "p1", None, NOW)
    assert t.supervise_running(snap, frozenset(), NOW, SL) == [
        t.FailTask("t1", "consumer disconnected")
    ]


def test_inference_lost_provider() -> None:
    for seen in (None, NOW - 16):
        assert t.supervise_running(running(seen=seen), frozenset(), NOW, SL) == [
            t.TakeBack("t1", 1, "provider lost")
        ]


def test_inference_a_provider_whose_channel_closed_and_that_stopped_heartbeating_is_lost() -> None:
    lim = t.SuperviseLimits(15, 60, 120, channel_grace_s=4)

    def after_close(seen: float, closed: float) -> list[t.SuperviseAction]:
        snap = t.RunningSnap("t1", 1, "p1", t.StreamSnap(1, "p1", NOW - 1), seen, closed)
        return t.supervise_running(snap, frozenset(), NOW, lim)

    # Silent since its channel closed, for the grace: its work moves, 11 s before the timeout.
    assert after_close(seen=NOW - 5, closed=NOW - 4) == [
        t.TakeBack("t1", 1, "provider lost: its channel closed")
    ]
    assert after_close(seen=NOW - 5, closed=NOW - 3.9) == []  # still within the grace
    # A heartbeat since the close: the agent lives (on HTTP) and keeps its work.
    assert after_close(seen=NOW - 2, closed=NOW - 4) == []
    # No grace set: only the node timeout decides.
    snap = t.RunningSnap("t1", 1, "p1", t.StreamSnap(1, "p1", NOW - 1), NOW - 5, NOW - 4)
    assert t.supervise_running(snap, frozenset(), NOW, SL) == []


def test_inference_stalled_provider() -> None:
    stalled = running(t.StreamSnap(1, "p1", NOW - 61))
    assert t.supervise_running(stalled, frozenset(), NOW, SL) == [
        t.TakeBack("t1", 1, "provider stalled")
    ]


def test_inference_unmatched_once_is_watched_twice_is_adopted() -> None:
    snap = running(t.StreamSnap(0, None, NOW - 61), attempt=2)
    first = t.supervise_running(snap, frozenset(), NOW, SL)
    assert first == [t.Watch(("t1", 2, "p1"))]
    second = t.supervise_running(snap, frozenset({("t1", 2, "p1")}), NOW, SL)
    # Adopted, and then the usual checks apply: here the stream has been silent too long.
    assert second == [t.Adopt("t1", 2, "p1"), t.TakeBack("t1", 2, "provider stalled")]
    healthy = running(t.StreamSnap(1, "p9", NOW), attempt=2)
    assert t.supervise_running(healthy, frozenset({("t1", 2, "p1")}), NOW, SL) == [
        t.Adopt("t1", 2, "p1")
    ]


def test_inference_queued_tasks() -> None:
    assert t.supervise_queued(t.QueuedSnap("q", NOW, False), NOW, SL) == [
        t.FailTask("q", "consumer disconnected")
    ]
    assert t.supervise_queued(t.QueuedSnap("q", NOW - 121, True), NOW, SL) == [
        t.FailTask("q", "no provider took it in time", notify=True)
    ]
    assert t.supervise_queued(t.QueuedSnap("q", NOW - 1.5, True), NOW, SL) == [t.Untarget("q")]
    assert t.supervise_queued(t.QueuedSnap("q", NOW - 1.0, True), NOW, SL) == []  # 1 s: not yet
    # Already in the shared queue: nothing to untarget, pass after pass.
    assert t.supervise_queued(t.QueuedSnap("q", NOW - 5, True, targeted=False), NOW, SL) == []


def test_inference_whole_pass_carries_the_unmatched_set_forward() -> None:
    moved = t.RunningSnap("t2", 3, "p2", t.StreamSnap(2, "p1", NOW), NOW)
    acts, unmatched = t.supervise(
        [running(), moved], [t.QueuedSnap("q", NOW - 2, True)], frozenset(), NOW, SL
    )
    assert acts == [t.Watch(("t2", 3, "p2")), t.Untarget("q")]
    assert unmatched == frozenset({("t2", 3, "p2")})
    acts, unmatched = t.supervise([moved], [], unmatched, NOW, SL)
    assert acts == [t.Adopt("t2", 3, "p2")] and unmatched == frozenset()
