"""The Batch API end to end: the official `openai` client against a real coordinator on
loopback with real agents (deterministic FakeEngine): files.create -> batches.create ->
batches.retrieve until it ends -> files.content of its output; the ledger checked entry by
entry (batch price per line, the refund of the unused escrow)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_grid import MODEL, Grid, start_grid, stop_grid

from idlegrid.core import ledger
from idlegrid.core.batch.money import escrow_account
from idlegrid.core.ledger import MICRO, Price, Share
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import AgentThread, CoordinatorThread, make_agent, wait_until

ENDED = ("completed", "failed", "expired", "cancelled")


@pytest.fixture
def grid(tmp_path: Path, database_url: str) -> Iterator[Grid]:
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL), FakeEngine(MODEL)])
    yield g
    g.verify()
    stop_grid(g)


def _line(cid: str, content: str, max_tokens: int = 6, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **body,
        },
    }


def _upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    return client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, timeout_s: float = 60.0) -> Any:
    seen: dict[str, Any] = {}

    def ended() -> bool:
        seen["b"] = client.batches.retrieve(batch_id)
        return seen["b"].status in ENDED

    wait_until(ended, timeout_s, 0.1)
    return seen["b"]


def _jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).content.decode()
    return [json.loads(x) for x in text.splitlines() if x]


def _offer(grid: Grid, node_id: str) -> Price:
    node = next(n for n in grid.nodes() if n["id"] == node_id)
    offer = node["offers"][MODEL]  # type: ignore[index]
    return Price(offer["prompt_price"], offer["output_price"])


def test_a_batch_runs_on_the_grid_at_the_batch_price(grid: Grid) -> None:
    client = grid.client()
    consumer = ledger.consumer_account(grid.key_id)
    prompts = {f"q{i}": f"Question number {i}, please" for i in range(6)}
    lines = [_line(cid, p) for cid, p in prompts.items()]
    before = grid.balance(consumer)
    batch = client.batches.create(
        input_file_id=_upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "in_progress" and batch.request_counts is not None
    assert batch.request_counts.total == 6 and batch.metadata == {"job": "nightly"}
    # The escrow entry, not the escrow's balance: lines may already be settling from it.
    (escrow,) = [e for e in grid.entries() if e["key"] == f"batch-escrow:{batch.id}"]
    moved = {p["account"]: p["amount"] for p in escrow["postings"]}  # type: ignore[index]
    escrowed = moved[escrow_account(batch.id)]
    assert escrowed > 0 and before - grid.balance(consumer) == escrowed == -moved[consumer]

    done = _wait(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert done.request_counts is not None and done.request_counts.completed == 6
    assert done.completed_at is not None and done.finalizing_at is not None
    out = _jsonl(client, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(prompts)

    # Each answer equals the same request sent interactively (temperature 0).
    for x in out:
        assert x["response"]["status_code"] == 200 and x["error"] is None
        body = x["response"]["body"]
        assert body["object"] == "chat.completion"
        same = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompts[x["custom_id"]]}],
            max_tokens=6,
            temperature=0,
        )
        assert body["choices"][0]["message"]["content"] == same.choices[0].message.content
        assert body["usage"]["completion_tokens"] == 6

    # The ledger: each line's entries name the batch and the line; its charge is the
    # serving provider's price halved; what the escrow did not spend came back.
    entries = grid.entries()
    charged = 0
    for x in out:
        cause = f"{batch.id}/{x['custom_id']}"
        mine = [e for e in entries if e["cause"] == {"kind": "batch_line", "id": cause}]
        assert [e["memo"] for e in mine] == ["hold", "settle"]
        settle = {p["account"]: p["amount"] for p in mine[1]["postings"]}  # type: ignore[index]
        (node,) = [a.split(":", 1)[1] for a in settle if a.startswith("accrual:")]
        full = _offer(grid, node)
        half = Price(full.prompt // 2, full.output // 2)
        usage = x["response"]["body"]["usage"]
        charge = Share(node, usage["prompt_tokens"], 6, half).charge()
        assert charge > 0
        assert settle[f"accrual:{node}"] + settle[ledger.FEES] == charge
        charged += charge
    (refund,) = [e for e in entries if e["memo"] == "batch refund (completed)"]
    assert refund["cause"] == {"kind": "batch", "id": batch.id}
    refunded = {p["account"]: p["amount"] for p in refund["postings"]}  # type: ignore[index]
    assert refunded[consumer] == escrowed - charged
    assert grid.balance(escrow_account(batch.id)) == 0
    # Interactive requests since cost full price; the batch cost exactly its charges.
    interactive = sum(
        -p["amount"]
        for e in entries
        if e["memo"] == "settle" and e["cause"]["kind"] == "request"  # type: ignore[index]
        for p in e["postings"]  # type: ignore[attr-defined]
        if p["account"] == "system:escrow"
    )
    assert interactive > 0
    assert [b.id for b in client.batches.list(limit=5).data] == [batch.id]


def test_bad_input_is_refused_precisely_and_nothing_is_held(grid: Grid) -> None:
    client = grid.client()
    consumer = ledger.consumer_account(grid.key_id)
    before = grid.balance(consumer)
    # A repeated custom_id: the batch fails validation, naming the line; nothing held.
    dup = client.batches.create(
        input_file_id=_upload(client, [_line("a", "x"), _line("a", "y")]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert dup.status == "failed" and dup.errors is not None and dup.errors.data
    assert (dup.errors.data[0].code, dup.errors.data[0].line) == ("duplicate_custom_id", 2)
    assert grid.balance(consumer) == before
    # A body the gateway refuses (an unknown model, a field it cannot honour) is that
    # line's entry in the error file, with the status and message the endpoint answers.
    mixed = client.batches.create(
        input_file_id=_upload(
            client,
            [
                _line("ok", "fine"),
                {**_line("nomodel", "x"), "body": {**_line("n", "x")["body"], "model": "nope"}},
                _line("badfield", "x", presence_penalty=7),
            ],
        ),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = _wait(client, mixed.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    errors = {x["custom_id"]: x for x in _jsonl(client, done.error_file_id)}
    assert errors["nomodel"]["response"]["status_code"] == 404
    assert "nope" in errors["nomodel"]["response"]["body"]["error"]["message"]
    assert errors["badfield"]["response"]["status_code"] == 400
    assert [x["custom_id"] for x in _jsonl(client, done.output_file_id)] == ["ok"]
    # Cancel of a finished batch: 409.
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(done.id)
    # Another key's file is no file (404), and another key's batch no batch.
    with grid.admin() as c:
        other = c.post("/api/v1/admin/keys", json={"name": "other"}).json()
    with openai.OpenAI(
        base_url=f"{grid.url}/v1", api_key=other["api_key"], max_retries=0
    ) as stranger:
        with pytest.raises(openai.NotFoundError):
            stranger.batches.create(
                input_file_id=mixed.input_file_id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
        with pytest.raises(openai.NotFoundError):
            stranger.batches.retrieve(done.id)
        # A balance too small for the batch's worst case: 402 naming it; nothing held.
        lines = [_line(f"r{i}", "x", max_tokens=2000) for i in range(3)]
        with pytest.raises(openai.APIStatusError) as info:
            stranger.batches.create(
                input_file_id=_upload(stranger, lines),
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
        assert info.value.status_code == 402
        assert "needs" in info.value.message
        assert stranger.batches.list().data == []
    # An endpoint and a window that are not served: 400 naming the field.
    with httpx.Client(base_url=grid.url, trust_env=False) as h:
        auth = {"authorization": f"Bearer {grid.api_key}"}
        r = h.post(
            "/v1/batches",
            headers=auth,
            json={
                "input_file_id": mixed.input_file_id,
                "endpoint": "/v1/x",
                "completion_window": "24h",
            },
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "endpoint"
        r = h.post(
            "/v1/batches",
            headers=auth,
            json={
                "input_file_id": mixed.input_file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "1h",
            },
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "completion_window"
    assert grid.balance(escrow_account(dup.id)) == 0
    assert grid.balance(escrow_account(mixed.id)) == 0


def _slow_grid(tmp_path: Path, database_url: str, n: int, **settings: Any) -> Grid:
    engines = [FakeEngine(MODEL, token_delay=0.05) for _ in range(n)]
    return start_grid(tmp_path, database_url, engines, **settings)


def _settled(grid: Grid, batch_id: str) -> dict[str, int]:
    """Each line's charge (custom_id -> µcr), from the settle entries that name it; a line
    settled twice would be charged twice, and fails here."""
    out: dict[str, int] = {}
    for e in grid.entries():
        cause = e["cause"]
        if cause["kind"] == "batch_line" and e["memo"] == "settle":  # type: ignore[index]
            bid, cid = cause["id"].split("/", 1)  # type: ignore[index]
            if bid == batch_id:
                fed = sum(
                    p["amount"]
                    for p in e["postings"]  # type: ignore[attr-defined]
                    if p["account"].startswith("accrual:") or p["account"] == ledger.FEES
                )
                assert cid not in out, f"line {cid} settled twice"
                out[cid] = fed
    return out


def test_a_line_goes_to_the_cheaper_provider_while_its_poll_is_claiming(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider whose poll is mid-claim with nothing in the shared queue is idle, not
    full: lines routed meanwhile still go to it, the cheaper, not to the dearer one (CI
    once charged a line 100x when the cheap provider was between two polls)."""
    from idlegrid.coordinator.inference import service

    monkeypatch.setenv("IDLEGRID_BATCH_IN_FLIGHT", "1")
    grid = start_grid(tmp_path, database_url, [FakeEngine(MODEL), FakeEngine(MODEL)])
    try:
        cheap = min(grid.nodes(), key=lambda n: _offer(grid, str(n["id"])).prompt)["id"]
        hub = grid.coordinator.app.state.services.inference.hub
        real = service.for_batch

        def routed_mid_claim(*args: Any, **kw: Any) -> Any:
            # Every line is routed while the cheap provider's poll claims (the race, held).
            hub.claiming[cheap] = hub.claiming.get(cheap, 0) + 1
            try:
                return real(*args, **kw)
            finally:
                hub.claiming[cheap] -= 1

        monkeypatch.setattr(service, "for_batch", routed_mid_claim)
        client = grid.client()
        lines = [_line(f"c{i}", f"Cheap question {i}") for i in range(3)]
        batch = client.batches.create(
            input_file_id=_upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        assert _wait(client, batch.id).status == "completed"
        served = [
            p["account"].split(":", 1)[1]
            for e in grid.entries()
            if e["memo"] == "settle" and e["cause"]["kind"] == "batch_line"  # type: ignore[index]
            for p in e["postings"]  # type: ignore[attr-defined]
            if p["account"].startswith("accrual:")
        ]
        assert served == [cheap] * 3, served
        grid.verify()
    finally:
        stop_grid(grid)


def _restart_and_wait(grid: Grid, client: Any, batch_id: str) -> tuple[Any, Any]:
    """Stop the coordinator, start it again on the same database, and wait for the batch
    to end: the new client and the ended batch."""
    client.close()
    grid.coordinator.stop()
    grid.coordinator = CoordinatorThread(grid.coordinator.settings)
    grid.coordinator.start()
    client = grid.client()
    return client, _wait(client, batch_id, 120)


def test_cancel_mid_way_refunds_the_undone_lines(tmp_path: Path, database_url: str) -> None:
    grid = _slow_grid(tmp_path, database_url, 1, batch_in_flight=1)
    try:
        client = grid.client()
        consumer = ledger.consumer_account(grid.key_id)
        before = grid.balance(consumer)
        lines = [_line(f"c{i}", f"line {i}", max_tokens=8) for i in range(12)]
        batch = client.batches.create(
            input_file_id=_upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )

        def some_done() -> bool:
            counts = client.batches.retrieve(batch.id).request_counts
            return counts is not None and counts.completed >= 2

        wait_until(some_done, 60, 0.05)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = _wait(client, batch.id)
        assert done.status == "cancelled" and done.cancelled_at is not None
        counts = done.request_counts
        assert counts is not None and counts.total == 12
        assert counts.completed + counts.failed == 12 and 2 <= counts.completed < 12
        answered = [x["custom_id"] for x in _jsonl(client, done.output_file_id)]
        undone = _jsonl(client, done.error_file_id)
        assert len(answered) == counts.completed and len(undone) == counts.failed
        assert all(x["error"]["code"] == "batch_cancelled" for x in undone)
        assert sorted(answered + [x["custom_id"] for x in undone]) == sorted(
            x["custom_id"] for x in lines
        )
        # Only answered lines were charged; the escrow's rest came back; none is left.
        charges = _settled(grid, batch.id)
        assert sorted(charges) == sorted(answered)
        assert before - grid.balance(consumer) == sum(charges.values())
        assert grid.balance(escrow_account(batch.id)) == 0
        assert grid.balance(ledger.ESCROW) == 0
        grid.verify()
    finally:
        stop_grid(grid)


def test_a_provider_killed_mid_batch_changes_nothing_for_the_consumer(
    tmp_path: Path, database_url: str
) -> None:
    grid = _slow_grid(tmp_path, database_url, 2, batch_in_flight=2)
    try:
        client = grid.client()
        prompts = {f"k{i}": f"kill test {i}" for i in range(8)}
        lines = [_line(cid, p, max_tokens=10) for cid, p in prompts.items()]
        batch = client.batches.create(
            input_file_id=_upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )

        def started() -> bool:
            counts = client.batches.retrieve(batch.id).request_counts
            return counts is not None and counts.completed >= 1

        wait_until(started, 60, 0.05)
        grid.agents[0].kill()
        done = _wait(client, batch.id, 120)
        assert done.status == "completed" and done.error_file_id is None
        out = {x["custom_id"]: x for x in _jsonl(client, done.output_file_id)}
        assert sorted(out) == sorted(prompts)
        for cid, x in out.items():
            same = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompts[cid]}],
                max_tokens=10,
                temperature=0,
            )
            body = x["response"]["body"]
            assert body["choices"][0]["message"]["content"] == same.choices[0].message.content
        assert grid.balance(escrow_account(batch.id)) == 0
        grid.verify()
    finally:
        stop_grid(grid)


def test_interactive_work_takes_a_batch_lines_slot_and_the_line_resumes(
    tmp_path: Path, database_url: str
) -> None:
    """One provider busy with a long batch line: an interactive request makes the line
    yield (handed back with a part commitment), is served at once, and the line continues
    afterwards from its delivered tokens: the same answer, charged once."""
    grid = _slow_grid(tmp_path, database_url, 1, batch_in_flight=1)
    try:
        client = grid.client()
        prompts = {"long-0": "a long line", "long-1": "another long line"}
        lines = [_line(cid, p, max_tokens=40) for cid, p in prompts.items()]
        batch = client.batches.create(
            input_file_id=_upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        wait_until(lambda: any(n["running"] for n in grid.nodes()), 60, 0.02)
        quick = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "quick"}], max_tokens=3
        )
        assert quick.choices[0].finish_reason in ("stop", "length")
        # Served while the first line (40 tokens at 50 ms) was still unfinished: it yielded.
        counts = client.batches.retrieve(batch.id).request_counts
        assert counts is not None and counts.completed == 0, counts
        done = _wait(client, batch.id, 120)
        assert done.status == "completed" and done.error_file_id is None
        out = {x["custom_id"]: x for x in _jsonl(client, done.output_file_id)}
        for cid, x in out.items():
            same = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompts[cid]}],
                max_tokens=40,
                temperature=0,
            )
            body = x["response"]["body"]
            assert body["choices"][0]["message"]["content"] == same.choices[0].message.content
            assert body["usage"]["completion_tokens"] == 40
        assert sorted(_settled(grid, batch.id)) == sorted(prompts)  # each line charged once
        with grid.http() as c:
            metrics = c.get("/metrics").text
        assert 'idlegrid_failovers_total{reason="handback"} 1.0' in metrics  # the yield
        assert grid.balance(escrow_account(batch.id)) == 0
        grid.verify()
    finally:
        stop_grid(grid)


def test_a_batch_past_its_window_expires_and_its_unrun_lines_are_refunded(
    tmp_path: Path, database_url: str
) -> None:
    grid = _slow_grid(
        tmp_path, database_url, 1, batch_in_flight=1, batch_windows={"24h": 86400, "2s": 2}
    )
    try:
        client = grid.client()
        consumer = ledger.consumer_account(grid.key_id)
        before = grid.balance(consumer)
        lines = [_line(f"e{i}", f"expiry {i}", max_tokens=10) for i in range(40)]
        batch = client.batches.create(
            input_file_id=_upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="2s",  # type: ignore[arg-type]
        )
        done = _wait(client, batch.id)
        assert done.status == "expired" and done.expired_at is not None
        counts = done.request_counts
        assert counts is not None and counts.failed > 0
        assert counts.completed + counts.failed == 40
        undone = _jsonl(client, done.error_file_id)
        assert len(undone) == counts.failed
        assert all(x["error"]["code"] == "batch_expired" for x in undone)
        charges = _settled(grid, batch.id)
        assert len(charges) == counts.completed
        assert before - grid.balance(consumer) == sum(charges.values())
        assert grid.balance(escrow_account(batch.id)) == 0
        grid.verify()
    finally:
        stop_grid(grid)


def test_a_restarted_coordinator_resumes_a_batch_in_progress(
    tmp_path: Path, database_url: str
) -> None:
    grid = _slow_grid(tmp_path, database_url, 1, batch_in_flight=1)
    try:
        client = grid.client()
        consumer = ledger.consumer_account(grid.key_id)
        before = grid.balance(consumer)
        lines = [_line(f"s{i}", f"restart {i}", max_tokens=8) for i in range(10)]
        batch = client.batches.create(
            input_file_id=_upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )

        def some_done() -> bool:
            counts = client.batches.retrieve(batch.id).request_counts
            return counts is not None and counts.completed >= 2

        wait_until(some_done, 60, 0.05)
        client, done = _restart_and_wait(grid, client, batch.id)
        assert done.status == "completed" and done.error_file_id is None
        out = _jsonl(client, done.output_file_id)
        assert sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)
        charges = _settled(grid, batch.id)
        assert sorted(charges) == sorted(x["custom_id"] for x in out)
        assert before - grid.balance(consumer) == sum(charges.values())
        assert grid.balance(escrow_account(batch.id)) == 0
        grid.verify()
        client.close()
    finally:
        stop_grid(grid)


def test_the_old_self_reported_batch_tokens_route_is_gone(grid: Grid) -> None:
    key = grid.agents[0].agent.client.key
    path = "/api/v1/nodes/orders/o1/tokens"
    raw = json.dumps({"tokens": 1000}).encode()
    headers = {
        **key.sign_headers("POST", path, raw, now=time.time()),
        "content-type": "application/json",
    }
    with httpx.Client(base_url=grid.url, trust_env=False) as h:
        r = h.post(path, content=raw, headers=headers)
    assert r.status_code == 410
    assert r.json()["error"]["data"]["use"] == "/v1/batches"


def test_the_cli_submits_waits_lists_and_fetches_results(grid: Grid, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from idlegrid.client.cli import app

    data_dir = tmp_path / "cli"
    data_dir.mkdir()
    (data_dir / "api-key").write_text(grid.api_key)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(_line(f"c{i}", f"cli {i}")) + "\n" for i in range(3)))
    base = ["--data-dir", str(data_dir), "--coordinator", grid.url]
    runner = CliRunner()
    sub = runner.invoke(app, ["batch", "submit", str(src), "--wait", "--json", *base])
    assert sub.exit_code == 0, sub.output
    batch = json.loads(sub.stdout)
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
    listed = runner.invoke(app, ["batch", "list", "--json", *base])
    assert [b["id"] for b in json.loads(listed.stdout)["data"]] == [batch["id"]]
    shown = runner.invoke(app, ["batch", "status", batch["id"], *base])
    assert shown.exit_code == 0 and "completed" in shown.stdout
    dst = tmp_path / "out.jsonl"
    got = runner.invoke(app, ["batch", "results", batch["id"], "-o", str(dst), *base])
    assert got.exit_code == 0, got.output
    answers = [json.loads(x) for x in dst.read_text().splitlines()]
    assert sorted(a["custom_id"] for a in answers) == ["c0", "c1", "c2"]
    again = runner.invoke(app, ["batch", "cancel", batch["id"], *base])
    assert again.exit_code == 1 and "completed" in again.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(_line("same", "x")) + "\n" for _ in range(2)))
    failed = runner.invoke(app, ["batch", "submit", str(bad), *base])
    assert failed.exit_code == 1 and "duplicate_custom_id" in failed.stdout


def test_a_line_whose_runner_fails_unexpectedly_is_tried_again(grid: Grid) -> None:
    """An exception that is not the line's fault (here injected: the first run of each line
    raises) must not leave the line "running" with nobody running it: it goes back to
    pending and is answered on the next try, charged once."""
    lines = grid.coordinator.app.state.services.batches.lines
    real, failed = lines.run, set()

    async def flaky(key_id: str, url: str, body: Any, tag: Any, cap: Price, settled=()) -> Any:
        if tag["custom_id"] not in failed:
            failed.add(tag["custom_id"])
            raise RuntimeError("injected")
        return await real(key_id, url, body, tag, cap, settled)

    lines.run = flaky
    with grid.client() as client:
        fid = _upload(client, [_line(f"c{i}", f"retry {i}") for i in range(3)])
        b = client.batches.create(
            input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = _wait(client, b.id)
        assert done.status == "completed", done
        assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
        out = _jsonl(client, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == ["c0", "c1", "c2"]
    assert failed == {"c0", "c1", "c2"}
    settles = [e for e in grid.entries() if str(e["cause"]["id"]).startswith(b.id)]  # type: ignore[index]
    assert sum(1 for e in settles if e["memo"] == "settle") == 3  # each line charged once


def test_a_line_settled_before_a_restart_is_rebuilt_not_charged_again(
    tmp_path: Path, database_url: str
) -> None:
    """The coordinator stops after a line's tasks settled but before the line was recorded
    (injected: its record is dropped, as a process killed between the two would leave it).
    The restarted coordinator rebuilds the line from the answers its tasks kept: the same
    answers (two choices, with logprobs), charged once, not run again."""
    grid = _slow_grid(tmp_path, database_url, 1, batch_in_flight=1)
    try:
        batches = grid.coordinator.app.state.services.batches
        real = batches._done

        def crash_before_recording(batch_id: str, n: int, *rest: Any) -> None:
            if n != 1:  # line 1 (custom_id "r1"): as if the process died right here
                real(batch_id, n, *rest)

        batches._done = crash_before_recording
        client = grid.client()
        body = {"n": 2, "logprobs": True, "top_logprobs": 1, "temperature": 0.8, "seed": 4}
        lines = [_line(f"r{i}", f"rebuild {i}", max_tokens=5, **body) for i in range(3)]
        batch = client.batches.create(
            input_file_id=_upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )

        def settles(cid: str) -> int:
            cause = {"kind": "batch_line", "id": f"{batch.id}/{cid}"}
            return sum(1 for e in grid.entries() if e["cause"] == cause and e["memo"] == "settle")

        def two_recorded_one_settled() -> bool:
            counts = client.batches.retrieve(batch.id).request_counts
            return counts is not None and counts.completed == 2 and settles("r1") == 2

        wait_until(two_recorded_one_settled, 60, 0.05)
        client, done = _restart_and_wait(grid, client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 3
        out = {x["custom_id"]: x["response"]["body"] for x in _jsonl(client, done.output_file_id)}
        again = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "rebuild 1"}], max_tokens=5, **body
        )
        rebuilt = out["r1"]
        assert [c["message"]["content"] for c in rebuilt["choices"]] == [
            c.message.content for c in again.choices
        ]
        assert [[e["logprob"] for e in c["logprobs"]["content"]] for c in rebuilt["choices"]] == [
            [e.logprob for e in c.logprobs.content] for c in again.choices
        ]
        assert rebuilt["usage"]["completion_tokens"] == again.usage.completion_tokens
        assert settles("r1") == 2  # one per choice: not run again
        assert grid.balance(escrow_account(batch.id)) == 0
        grid.verify()
        client.close()
    finally:
        stop_grid(grid)


def test_a_line_cut_short_runs_only_its_unsettled_choices_after_a_restart(
    tmp_path: Path, database_url: str
) -> None:
    """n = 3 on one slot, so the choices run one after another: the coordinator stops once
    two have settled, while the third runs. The restarted one runs only the third; the
    answer has all three (the same as the request sent interactively), each choice is
    settled once, and the escrow ends empty."""
    grid = _slow_grid(tmp_path, database_url, 1, batch_in_flight=1)
    try:
        client = grid.client()
        body = {"n": 3, "temperature": 0.8, "seed": 9}
        batch = client.batches.create(
            input_file_id=_upload(client, [_line("p0", "partial 0", max_tokens=20, **body)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        cause = {"kind": "batch_line", "id": f"{batch.id}/p0"}

        def settles() -> int:
            return sum(1 for e in grid.entries() if e["cause"] == cause and e["memo"] == "settle")

        wait_until(lambda: settles() == 2, 60, 0.02)
        client, done = _restart_and_wait(grid, client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 1
        out = {x["custom_id"]: x["response"]["body"] for x in _jsonl(client, done.output_file_id)}
        again = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "partial 0"}], max_tokens=20, **body
        )
        assert [c["message"]["content"] for c in out["p0"]["choices"]] == [
            c.message.content for c in again.choices
        ]
        assert [c["index"] for c in out["p0"]["choices"]] == [0, 1, 2]
        assert out["p0"]["usage"]["completion_tokens"] == again.usage.completion_tokens
        assert settles() == 3  # the two settled before the restart were not run again
        # The third choice's first task was cut short: released uncharged, run once more.
        assert [e["memo"] for e in grid.entries() if e["cause"] == cause].count("release") == 1
        assert grid.balance(escrow_account(batch.id)) == 0
        grid.verify()
        client.close()
    finally:
        stop_grid(grid)


def test_a_batch_with_no_provider_says_why_and_runs_once_one_comes(
    tmp_path: Path, database_url: str
) -> None:
    """Every provider gone: the lines wait (not the error file) and the batch object, the
    CLI's `orders` and `explain` say why; a provider that joins runs them all."""
    from typer.testing import CliRunner

    from idlegrid.client.cli import app

    grid = _slow_grid(tmp_path, database_url, 1)
    try:
        client = grid.client()
        grid.agents[0].kill()
        wait_until(lambda: not any(n["live"] for n in grid.nodes()), 30, 0.05)
        lines = [_line(f"w{i}", f"waiting {i}") for i in range(2)]
        batch = client.batches.create(
            input_file_id=_upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        seen: dict[str, Any] = {}

        def waiting() -> bool:
            seen["b"] = client.batches.retrieve(batch.id).model_dump()
            return seen["b"].get("waiting") is not None

        wait_until(waiting, 30, 0.05)
        assert "no live provider" in seen["b"]["waiting"]["reason"], seen["b"]
        assert seen["b"]["status"] == "in_progress"
        data_dir = tmp_path / "cli"
        data_dir.mkdir()
        (data_dir / "api-key").write_text(grid.api_key)
        base = ["--data-dir", str(data_dir), "--coordinator", grid.url]
        runner = CliRunner()
        listed = runner.invoke(app, ["market", "orders", "--json", *base])
        assert listed.exit_code == 0, listed.output
        (row,) = json.loads(listed.stdout)["batches"]
        assert row["id"] == batch.id and row["waiting"]["reason"] == seen["b"]["waiting"]["reason"]
        why = runner.invoke(app, ["market", "explain", batch.id, *base])
        assert why.exit_code == 0 and "wait for capacity" in why.stdout, why.output
        # A provider joins: the lines run, the reason goes.
        joined = AgentThread(
            make_agent(grid.url, [FakeEngine(MODEL)], "late", price=Price(10 * MICRO, 40 * MICRO))
        )
        joined.start()
        grid.agents.append(joined)
        done = _wait(client, batch.id, 60)
        assert done.status == "completed" and done.request_counts.completed == 2
        assert done.model_dump().get("waiting") is None
        grid.verify()
        client.close()
    finally:
        stop_grid(grid)
