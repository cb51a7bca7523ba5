"""A training job nobody takes expires, and its escrow comes back whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_training_grid import Grid, spec

from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO


@pytest.fixture
def grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Grid]:
    monkeypatch.setenv("IDLEGRID_TRAIN_QUEUE_TTL_S", "1")
    g = Grid(tmp_path)
    yield g
    g.stop()


def test_a_queued_job_expires_with_a_full_refund(grid: Grid) -> None:
    r = grid.submit({"spec": spec()})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert grid.balances()[ledger.consumer_account(grid.key_id)] < 10 * MICRO  # escrowed
    job = grid.wait_state(job_id, "expired", timeout_s=30)
    assert any(e["kind"] == "expired" for e in job["events"]), job["events"]
    assert grid.balances()[ledger.consumer_account(grid.key_id)] == 10 * MICRO
    grid.check_books()
