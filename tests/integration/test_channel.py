"""The agent channel (one WebSocket per agent): served work, signed frames, fallback to HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from test_grid import MODEL, Grid, expected, start_grid, stop_grid
from websockets.exceptions import ConnectionClosed, InvalidStatus

from idlegrid.agent.channel import CHANNEL_PATH
from idlegrid.core import ledger
from idlegrid.engines.fake import FakeEngine
from idlegrid.protocol.signing import NodeKey
from idlegrid.testbed.inprocess import wait_until


@pytest.fixture
def grid(tmp_path: Path, database_url: str) -> Iterator[Grid]:
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL)])
    yield g
    g.verify()
    stop_grid(g)


def _ws_url(grid: Grid) -> str:
    return "ws" + grid.url.removeprefix("http") + CHANNEL_PATH


def _agent_key(grid: Grid) -> NodeKey:
    return grid.agents[0].agent.client.key


def key_clock() -> float:
    return time.time()


def _connect(grid: Grid, key: NodeKey) -> websockets.connect:
    headers = key.sign_headers("GET", CHANNEL_PATH, b"", now=key_clock())
    return websockets.connect(_ws_url(grid), additional_headers=headers)


def _frame(key: NodeKey, obj: dict[str, object]) -> bytes:
    return key.sign_frame(CHANNEL_PATH, json.dumps(obj).encode(), now=key_clock())


def test_agent_serves_over_the_channel(grid: Grid) -> None:
    agent = grid.agents[0].agent
    wait_until(lambda: agent.channel is not None and agent.channel.open)
    stream = grid.client().completions.create(
        model=MODEL, prompt="hello", max_tokens=12, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == expected("hello", 12, temperature=0.0)
    assert agent.channel is not None
    assert agent.channel.tasks_received == 1
    # One poll frame, then the uploads: the task and the output never touched HTTP.
    assert agent.channel.frames_sent >= 2
    wait_until(lambda: agent.served == 1)


def test_handshake_must_be_signed_for_the_channel(grid: Grid) -> None:
    key = _agent_key(grid)

    async def attempt(headers: dict[str, str]) -> int:
        with pytest.raises(InvalidStatus) as exc:
            await websockets.connect(_ws_url(grid), additional_headers=headers)
        return exc.value.response.status_code

    wrong_path = key.sign_headers("GET", "/api/v1/work/poll", b"", now=key_clock())
    assert asyncio.run(attempt(wrong_path)) == 403
    assert asyncio.run(attempt({})) == 403
    stranger = NodeKey.generate()  # never registered
    assert (
        asyncio.run(attempt(stranger.sign_headers("GET", CHANNEL_PATH, b"", now=key_clock())))
        == 403
    )


def test_bad_replayed_and_malformed_frames_close_the_channel(grid: Grid) -> None:
    key = _agent_key(grid)

    async def closed_by(frames: list[bytes]) -> tuple[int | None, str]:
        async with _connect(grid, key) as ws:
            for f in frames:
                await ws.send(f)
            messages = []
            with pytest.raises(ConnectionClosed):
                while True:
                    messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        assert ws.close_code is not None
        errors = [m["message"] for m in messages if m.get("op") == "error"]
        return ws.close_code, errors[-1] if errors else ""

    cancel = {"op": "cancel", "slot": 7}
    good = _frame(key, cancel)
    tampered = good.replace(b'"slot": 7', b'"slot": 8')
    assert asyncio.run(closed_by([tampered])) == (1008, "bad signature")
    assert asyncio.run(closed_by([good, good])) == (1008, "replayed nonce")
    assert asyncio.run(closed_by([b"no signature here"]))[0] == 1008
    code, why = asyncio.run(closed_by([_frame(key, {"op": "dance"})]))
    assert code == 1003 and "op" in why
    code, why = asyncio.run(
        closed_by(
            [_frame(key, {"op": "upload", "task_id": "t", "attempt": 0, "start": 0, "pieces": []})]
        )
    )
    assert code == 1003 and "attempt" in why


def test_upload_for_an_attempt_not_held_is_refused_and_the_channel_stays(grid: Grid) -> None:
    key = _agent_key(grid)

    async def run() -> list[dict[str, object]]:
        async with _connect(grid, key) as ws:
            return await exchange(ws)

    async def exchange(ws: websockets.ClientConnection) -> list[dict[str, object]]:
        await ws.send(
            _frame(
                key,
                {
                    "op": "upload",
                    "task_id": "cmpl-nope",
                    "attempt": 1,
                    "start": 0,
                    "pieces": [[5, "x"]],
                },
            )
        )
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        await ws.send(_frame(key, {"op": "sync", "task_id": "cmpl-nope", "attempt": 1}))
        synced = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert synced["op"] == "refused" and synced["code"] == "stale_attempt"
        # Still open: a poll is answered (idle after its wait, nothing is queued).
        await ws.send(_frame(key, {"op": "poll", "slot": 3, "models": [MODEL], "wait_s": 0.2}))
        second = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return [first, second]

    refused, idle = asyncio.run(run())
    assert refused["op"] == "refused" and refused["code"] == "stale_attempt"
    assert idle == {"op": "idle", "slot": 3}


def test_answer_survives_the_channel_dropping_mid_stream(tmp_path: Path, database_url: str) -> None:
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL, token_delay=0.03)])
    try:
        agent_thread = g.agents[0]
        agent = agent_thread.agent
        wait_until(lambda: agent.channel is not None and agent.channel.open)
        first = agent.channel
        assert first is not None
        consumer = ledger.consumer_account(g.key_id)
        before = g.balance(consumer)
        stream = g.client().completions.create(
            model=MODEL,
            prompt="drop",
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts: list[str] = []
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices:
                texts.append(chunk.choices[0].text)
            if len(texts) == 5:
                # Cut the connection under the agent, as a network blip would.
                asyncio.run_coroutine_threadsafe(first.ws.close(), agent_thread.loop).result(5)
        assert "".join(texts) == expected("drop", 30, temperature=0.0)
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 30
        wait_until(lambda: agent.served == 1)
        # Settled once, by the same provider, for every token.
        entries = [e for e in g.entries() if e["cause"]["id"] == chunks[0].id]  # type: ignore[index]
        assert [e["memo"] for e in entries] == ["hold", "settle"]
        spent = before - g.balance(consumer)
        assert spent == sum(n["earned"] for n in g.nodes()) + g.balance(ledger.FEES) > 0  # type: ignore[misc]
        # The agent reconnects by itself.
        wait_until(
            lambda: agent.channel is not None and agent.channel is not first and agent.channel.open
        )
        g.verify()
    finally:
        stop_grid(g)


def test_non_streaming_answers_are_uploaded_in_fewer_larger_frames(
    tmp_path: Path, database_url: str
) -> None:
    # 40 tokens at 20 ms each: a streaming consumer gets one frame per 25 ms or so; one that
    # reads nothing until the end gets a frame per 250 ms (failover still has them).
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL, token_delay=0.02)])
    try:
        agent = g.agents[0].agent
        wait_until(lambda: agent.channel is not None and agent.channel.open)
        channel = agent.channel
        assert channel is not None

        def frames_for(stream: bool) -> int:
            before, served = channel.frames_sent, agent.served
            r = g.client().completions.create(
                model=MODEL, prompt="frames", max_tokens=40, temperature=0, stream=stream
            )
            text = (
                "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
            )  # type: ignore[union-attr]
            assert text == expected("frames", 40, temperature=0.0)
            wait_until(lambda: agent.served == served + 1)
            return channel.frames_sent - before

        streamed, batched = frames_for(True), frames_for(False)
        assert streamed >= 15
        assert batched <= 8
    finally:
        stop_grid(g)
