"""The pure money and result rules of batches (core/batch/money.py, results.py)."""

from __future__ import annotations

import pytest

from idlegrid.core import ledger
from idlegrid.core.batch import results
from idlegrid.core.batch.money import (
    batch_escrow,
    batch_price,
    batch_refund,
    escrow_account,
    line_cause,
    provider_share,
)
from idlegrid.core.ledger import Price


def test_the_batch_price_is_a_share_of_the_interactive_one() -> None:
    assert batch_price(Price(1_001, 4_000)) == Price(500, 2_000)  # rounded down, for the payer
    assert batch_price(Price(1_000, 4_000), 2_500) == Price(250, 1_000)
    assert batch_price(Price(1_000, 4_000), 10_000) == Price(1_000, 4_000)
    assert batch_price(Price(1_000, 4_000), None) is None  # opted out of batch work
    with pytest.raises(ValueError):
        batch_price(Price(1, 1), 10_001)


def test_escrow_and_refund_balance_and_name_the_batch() -> None:
    held = batch_escrow("b", "consumer:k", 700)
    assert held.cause == ledger.Cause("batch", "b")
    assert {p.account: p.amount for p in held.postings} == {
        "consumer:k": -700,
        escrow_account("b"): 700,
    }
    back = batch_refund("b", "consumer:k", 300, "cancelled")
    assert back.memo == "batch refund (cancelled)" and back.key != held.key
    assert ledger.apply(ledger.apply({"consumer:k": 700}, held), back) == {
        "consumer:k": 300,
        escrow_account("b"): 400,
    }
    assert line_cause("b", "q1") == ledger.Cause("batch_line", "b/q1")


def test_result_lines_are_openais_shape() -> None:
    ok = results.answered("batch_req_1", "q1", "chatcmpl-1", {"object": "chat.completion"})
    assert ok["response"]["status_code"] == 200 and ok["error"] is None
    bad = results.refused("batch_req_2", "q2", "r", 404, {"message": "no such model"})
    assert bad["response"]["body"] == {"error": {"message": "no such model"}}
    late = results.unfinished("batch_req_3", "q3", "expired")
    assert late["response"] is None and late["error"]["code"] == "batch_expired"
    assert results.unfinished("x", "q", "cancelled")["error"]["code"] == "batch_cancelled"


def test_completion_windows() -> None:
    assert results.window_seconds("24h") == 86_400
    assert results.window_seconds("2s", {"2s": 2}) == 2
    with pytest.raises(ValueError, match="24h"):
        results.window_seconds("1h")
    assert not results.expired(100.0, 10.0, 109.9)
    assert results.expired(100.0, 10.0, 110.0)


def test_a_providers_share_is_its_own_else_the_grids() -> None:
    assert provider_share(True, None, 5_000) == 5_000
    assert provider_share(True, 2_500, 5_000) == 2_500
    assert provider_share(True, 0, 5_000) == 0  # batch work for free is its call
    assert provider_share(False, 2_500, 5_000) is None
