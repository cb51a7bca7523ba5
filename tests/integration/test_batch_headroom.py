"""A provider's headroom slot (issue 17, "batch yields"): batch lines fill every slot but
the ones its engine keeps for interactive work, so an interactive request that arrives
during a batch is served there at once, with no line handed back. A real coordinator on
loopback, a real agent (three FakeEngine slots, one of them headroom), the official client.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from sqlalchemy import select

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.db.tables import Attempt, Task
from idlegrid.core.ledger import MICRO
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
    wait_until,
)

MODEL = "fake:1"
LINES = 5
TOKENS = 30  # at 50 ms a token: each line holds its slot for 1.5 s


class Grid:
    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.coord = CoordinatorThread(
            CoordinatorSettings(
                data_dir=tmp_path,
                database_url=database_url,
                port=free_port(),
                heartbeat_interval_s=0.3,
                node_timeout_s=3.0,
                long_poll_s=5.0,
                batch_in_flight=3,  # the batch would take every slot if it were let
            )
        )
        self.coord.start()
        engines = [FakeEngine(MODEL, token_delay=0.05) for _ in range(3)]
        self.agent = AgentThread(make_agent(self.coord.url, engines, "p", headroom=1))
        self.agent.start()
        wait_for_live(self.coord.url, 1)
        with self.coord.admin() as c:
            key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 10 * MICRO, "reference": "t"},
            ).raise_for_status()
        self.client = openai.OpenAI(
            base_url=f"{self.coord.url}/v1", api_key=key["api_key"], max_retries=0
        )
        self.store = self.coord.app.state.services.store

    def metrics(self) -> str:
        with self.coord.admin() as c:
            return c.get("/metrics").text

    def batch_attempts(self) -> list[tuple[float, float]]:
        """(start, end) of every batch line attempt (end: now, if it still runs)."""
        with self.store.read() as s:
            rows = s.execute(
                select(Attempt.started_at, Attempt.ended_at)
                .join(Task, Task.id == Attempt.task_id)
                .where(Task.priority == 1)
            ).all()
        return [(a, b if b is not None else float("inf")) for a, b in rows]

    def stop(self) -> None:
        self.client.close()
        self.agent.stop(10)
        self.coord.stop()


@pytest.fixture
def grid(tmp_path: Path, database_url: str) -> Iterator[Grid]:
    g = Grid(tmp_path, database_url)
    yield g
    g.stop()


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_interactive_work_takes_the_headroom_slot_and_no_line_yields(grid: Grid) -> None:
    _headroom_serves_mid_batch(grid)


def test_a_headroom_poll_between_claims_is_waited_for_not_made_room_for(
    grid: Grid, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interactive request is routed while no poll of the node is parked (each is
    between two claims, held here): the free headroom slot takes it on its next claim and
    no batch line is asked to hand its slot back."""
    hub = grid.coord.app.state.services.inference.hub
    monkeypatch.setattr(hub, "take_parked", lambda node_id: None)
    _headroom_serves_mid_batch(grid)


def _headroom_serves_mid_batch(grid: Grid) -> None:
    (node,) = grid.coord.app.state.services.nodes.cache.values()
    assert node.slots == 3 and node.engine["headroom"] == 1
    lines = [
        {
            "custom_id": f"l{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"line {i}"}],
                "max_tokens": TOKENS,
                "temperature": 0,
            },
        }
        for i in range(LINES)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    file_id = grid.client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id
    batch = grid.client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(lambda: _most_at_once(grid.batch_attempts()) >= 2, 30, 0.02)

    quick = grid.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "quick"}], max_tokens=3
    )
    assert quick.choices[0].finish_reason in ("stop", "length")
    counts = grid.client.batches.retrieve(batch.id).request_counts
    assert counts is not None and counts.completed < LINES, counts  # served mid-batch

    def ended() -> bool:
        return grid.client.batches.retrieve(batch.id).status in ("completed", "failed")

    wait_until(ended, 60, 0.1)
    assert grid.client.batches.retrieve(batch.id).status == "completed"
    # Lines never took the headroom slot, and none was asked to hand its slot back.
    assert _most_at_once(grid.batch_attempts()) == 2
    assert 'reason="handback"' not in grid.metrics()
