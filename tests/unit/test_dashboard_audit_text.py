"""The providers table's audit and reputation columns: truthful words, never a bare dash
while audits wait for a verifier."""

from __future__ import annotations

from typing import Any

from idlegrid.coordinator.dashboard.data import audits_text, reputation_text


def _a(**kw: Any) -> dict[str, Any]:
    base = {"passed": 0, "failed": 0, "open": 0, "verifiable": True, "engine": "llama.cpp",
            "ejected": False, "spoofer_probability": 0.05}  # fmt: skip
    return {**base, **kw}


def test_the_audit_column_says_what_happened_and_why_audits_wait() -> None:
    assert audits_text(None) == "—"
    assert audits_text(_a()) == "none yet"
    assert audits_text(_a(passed=12, failed=1, open=2)) == "12 passed · 1 failed · 2 pending"
    assert audits_text(_a(open=3, verifiable=False)) == "3 pending: no verifier for llama.cpp"
    assert audits_text(_a(passed=4, verifiable=False)) == (
        "4 passed · unaudited: no verifier for llama.cpp"
    )
    assert audits_text(_a(failed=1, ejected=True)) == "ejected · 1 failed"


def test_reputation_is_trusts_posterior_in_words() -> None:
    assert reputation_text(None) == "—"
    assert reputation_text(_a(spoofer_probability=0.05)) == "95% honest"
    assert reputation_text(_a(spoofer_probability=0.999)) == "0% honest"
