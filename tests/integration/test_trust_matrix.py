"""CI-size cheat matrix and honest audits (the benchmark runs the same code with 1,000s)."""

from __future__ import annotations

from idlegrid.testbed.trust_matrix import cheat_matrix, honest


def test_every_cheat_is_detected_on_every_audit() -> None:
    rates = cheat_matrix(12)
    assert rates == {k: 1.0 for k in "abcdef"}, rates


def test_honest_audits_across_thread_counts_never_fail() -> None:
    fails, rels, _, _, _ = honest(24)
    assert fails == 0
    assert max(rels) < 1e-5  # far inside the 1e-4 tolerance
