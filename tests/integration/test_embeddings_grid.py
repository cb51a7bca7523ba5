"""/v1/embeddings on a real loopback grid: all-MiniLM-L6-v2 providers and a verifier, the
official openai client. Honest vectors equal the engine's, are billed per input token and
pass every audit; a provider serving a cheaper model's vectors fails its first audit and is
slashed and ejected."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Cause, Posting, Price
from idlegrid.engines.minilm import MODEL_ID, MiniLMEngine
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
)

pytestmark = pytest.mark.slow
STAKE = 50 * MICRO
PRICE = Price(10 * MICRO, 40 * MICRO)
# An audit has a verdict only here: "assigned" is a verifier still computing.
DECIDED = {"passed", "failed", "overturned"}
TEXTS = ["The cat sits on the mat.", "A feline rests on a rug.", "Quarterly revenue grew 5%."]


def _wait(cond, timeout_s: float = 60.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        ev.wait(0.05)
    raise TimeoutError("condition not reached")


@pytest.fixture(scope="module")
def reference() -> Iterator[MiniLMEngine]:
    engine = MiniLMEngine(threads=1)
    yield engine
    engine.close()


@pytest.fixture
def grid(tmp_path: Path) -> Iterator:
    started: list = []

    def start(provider_engine) -> tuple:
        settings = CoordinatorSettings(
            data_dir=tmp_path,
            database_url=f"sqlite:///{tmp_path}/c.db",
            port=free_port(),
            fee_bps=2000,
            heartbeat_interval_s=0.3,
            node_timeout_s=5.0,
            long_poll_s=2.0,
        )
        coord = CoordinatorThread(settings)
        coord.start()
        started.append(coord)
        provider = make_agent(coord.url, [provider_engine], "provider", price=PRICE)
        # The verifier runs on 2 threads, the provider on 1: a cross-class audit.
        verifier = make_agent(
            coord.url,
            [MiniLMEngine(threads=2)],
            "verifier",
            verifier=True,
            price=Price(1000 * MICRO, 4000 * MICRO),  # dearer: requests go to the provider
        )
        for agent in (provider, verifier):
            t = AgentThread(agent)
            t.start()
            started.append(t)
        wait_for_live(coord.url, 2)
        store = coord.app.state.services.store
        with coord.admin() as c:
            key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 100 * MICRO, "reference": "m"},
            )
            nodes = {n["name"]: n["id"] for n in c.get("/api/v1/status").json()["nodes"]}
        for name in ("provider", "verifier"):
            acct = ledger.stake_account(nodes[name], "cpu")
            store.post(
                ledger.make_entry(
                    f"stake:{name}",
                    Cause("test", name),
                    [Posting(ledger.ISSUER, -STAKE), Posting(acct, STAKE)],
                )
            )
        return coord, key, nodes

    yield start
    for s in reversed(started):
        s.stop() if isinstance(s, CoordinatorThread) else s.stop(10)


def _status(coord: CoordinatorThread) -> dict:
    with coord.admin() as c:
        return c.get("/api/v1/status").json()


def _audits(coord: CoordinatorThread, node_id: str) -> list[dict]:
    with coord.admin() as c:
        audits = c.get("/api/v1/audits").json()["audits"]
    return [a for a in audits if a["node_id"] == node_id and not a["canary"]]


def _client(coord: CoordinatorThread, key: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0)


def test_embeddings_match_the_engine_are_billed_per_token_and_pass_audits(grid, reference) -> None:
    coord, key, nodes = grid(MiniLMEngine(threads=1))
    consumer = ledger.consumer_account(key["key_id"])
    before = _status(coord)["balances"][consumer]
    with _client(coord, key) as client:
        assert MODEL_ID in [m.id for m in client.models.list().data]
        got = client.embeddings.create(model=MODEL_ID, input=TEXTS)  # base64 on the wire
        floats = client.embeddings.create(model=MODEL_ID, input=TEXTS, encoding_format="float")
        one = client.embeddings.create(model=MODEL_ID, input=TEXTS[0], dimensions=384)
        ids = client.embeddings.create(model=MODEL_ID, input=[reference.tokenize(TEXTS[2])])
    ref_ids = [reference.tokenize(t) for t in TEXTS]
    want = reference.embed(ref_ids)
    vectors = np.array([d.embedding for d in got.data], np.float32)
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == MODEL_ID
    assert np.abs(vectors - want).max() <= 2e-5  # the audit tolerance
    # base64 and float encodings carry the same float32 numbers.
    assert np.array_equal(np.array([d.embedding for d in floats.data], np.float32), vectors)
    # Alone rather than in a batch of three (other padding): the same within the tolerance.
    assert np.abs(np.array(one.data[0].embedding, np.float32) - vectors[0]).max() <= 2e-5
    assert np.abs(np.array(ids.data[0].embedding, np.float32) - vectors[2]).max() <= 2e-5
    raw = httpx.post(
        f"{coord.url}/v1/embeddings",
        json={"model": MODEL_ID, "input": TEXTS, "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {key['api_key']}"},
        trust_env=False,
        timeout=60,
    ).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]]
    assert np.array_equal(np.array(decoded), vectors)  # OpenAI's base64: float32 LE bytes
    cos = vectors @ vectors.T
    assert cos[0, 1] > 0.5 > abs(cos[0, 2])  # the cat and the feline, not the revenue
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    # Billed per input token at the provider's prompt price: the commitment's count.
    tokens = sum(map(len, ref_ids))
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
    assert ids.usage.prompt_tokens == len(ref_ids[2])
    _wait(lambda: len(_audits(coord, nodes["provider"])) == 5)  # probation: every answer
    _wait(lambda: all(a["state"] in DECIDED for a in _audits(coord, nodes["provider"])))
    audits = _audits(coord, nodes["provider"])
    assert all(a["state"] == "passed" for a in audits), audits
    assert all(a["verdict"]["worst_abs"] <= 2e-7 for a in audits), audits
    st = _status(coord)
    charged = before - st["balances"][consumer]
    billed = (tokens, tokens, len(ref_ids[0]), len(ref_ids[2]), tokens)  # five requests
    assert charged == sum(ledger.token_cost(n, PRICE.prompt) for n in billed)
    me = st["trust"]["nodes"][nodes["provider"]]
    assert me["passed"] == 5 and me["failed"] == 0 and not me["ejected"]
    assert st["balances"].get(ledger.provider_account(nodes["verifier"]), 0) > 0


def test_bad_embedding_requests_are_refused_naming_the_field(grid) -> None:
    coord, key, _ = grid(MiniLMEngine(threads=1))
    consumer = ledger.consumer_account(key["key_id"])
    before = _status(coord)["balances"][consumer]
    cases = [
        ({"input": "word " * 300}, "input"),  # over the 256-token window (provider-side)
        ({"input": [[101] * 300]}, "input"),  # the same as token ids (gateway-side)
        ({"input": [[101, 99999, 102]]}, "input"),  # not in the vocabulary
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": ["ok"] * 257}, "input"),  # over 256 inputs
        ({"input": "ok", "dimensions": 128}, "dimensions"),
        ({"input": "ok", "extra_body": {"truncate": True}}, "truncate"),
    ]
    with _client(coord, key) as client:
        for kwargs, param in cases:
            with pytest.raises(openai.BadRequestError) as exc:
                client.embeddings.create(model=MODEL_ID, **kwargs)
            assert exc.value.body["param"] == param, (kwargs, exc.value.body)
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "hi"}]
            )
        assert exc.value.body["param"] == "model"
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="no-such-model", input="x")
    assert _status(coord)["balances"][consumer] == before  # nothing was charged


def test_cheaper_models_vectors_fail_their_audit_and_are_slashed(grid) -> None:
    coord, key, nodes = grid(cheats.MiniLMTruncated(threads=1))
    with _client(coord, key) as client:
        got = client.embeddings.create(model=MODEL_ID, input=TEXTS)
    assert len(got.data) == 3  # the consumer got vectors; the audit finds them wrong
    _wait(lambda: any(a["state"] == "failed" for a in _audits(coord, nodes["provider"])))
    failed = [a for a in _audits(coord, nodes["provider"]) if a["state"] == "failed"]
    assert "differ from the recomputation" in " ".join(failed[0]["verdict"]["reasons"])
    st = _status(coord)
    me = st["trust"]["nodes"][nodes["provider"]]
    assert me["ejected"] and me["failed"] == 1  # a failure in probation ejects
    assert st["balances"].get(ledger.stake_account(nodes["provider"], "cpu"), 0) == 0
    assert st["trust"]["nodes"][nodes["verifier"]]["failed"] == 0


def test_embedding_answers_get_canaries_an_honest_verifier_rejects(grid, monkeypatch) -> None:
    """A turned vector in a consistent blob: the honest verifier's recomputation misses it,
    so the canary fails as built; nobody is slashed (a verifier that approved it would be)."""
    monkeypatch.setenv("IDLEGRID_TRUST_CANARY_RATE", "1.0")
    coord, key, nodes = grid(MiniLMEngine(threads=1))
    with _client(coord, key) as client:
        for text in TEXTS[:2]:
            client.embeddings.create(model=MODEL_ID, input=[text])

    def canaries() -> list[dict]:
        with coord.admin() as c:
            return [a for a in c.get("/api/v1/audits").json()["audits"] if a["canary"]]

    _wait(lambda: len(canaries()) == 2 and all(a["state"] in DECIDED for a in canaries()))
    assert all(a["state"] == "failed" and a["id"].startswith("aud-") for a in canaries())
    st = _status(coord)
    v, p = (st["trust"]["nodes"][nodes[n]] for n in ("verifier", "provider"))
    assert v["verifier_failed"] == 0 and not v["ejected"], v
    assert p["failed"] == 0 and not p["ejected"], p
    assert st["balances"][ledger.stake_account(nodes["verifier"], "cpu")] == STAKE


def test_an_embeddings_batch_runs_at_the_batch_price_and_is_audited(
    grid, reference, monkeypatch
) -> None:
    """/v1/embeddings lines in a batch: the official client's files -> batches -> output
    file; each line's vectors are the engine's, billed per input token at half the
    provider's prompt price, and audited like any answer."""
    import io
    import json

    # One line at a time: each goes to the cheaper provider (the verifier also sells).
    monkeypatch.setenv("IDLEGRID_BATCH_IN_FLIGHT", "1")
    coord, key, nodes = grid(MiniLMEngine(threads=1))
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": MODEL_ID, "input": [text], "encoding_format": fmt}}
        for i, (text, fmt) in enumerate(zip(TEXTS, ("float", "base64", "float"), strict=True))
    ]  # fmt: skip
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    with _client(coord, key) as client:
        fid = client.files.create(file=("e.jsonl", io.BytesIO(data)), purpose="batch").id
        batch = client.batches.create(
            input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h"
        )
        _wait(lambda: client.batches.retrieve(batch.id).status in ("completed", "failed"))
        done = client.batches.retrieve(batch.id)
        assert done.status == "completed" and done.error_file_id is None, done
        text = client.files.content(done.output_file_id).content.decode()
    out = {x["custom_id"]: x["response"]["body"] for x in map(json.loads, text.splitlines())}
    ids = [reference.tokenize(t) for t in TEXTS]
    want = reference.embed(ids)
    for i, fmt in enumerate(("float", "base64", "float")):
        body = out[f"e{i}"]
        raw = body["data"][0]["embedding"]
        got = (
            np.frombuffer(base64.b64decode(raw), "<f4")
            if fmt == "base64"
            else np.array(raw, np.float32)
        )
        assert np.abs(got - want[i]).max() <= 2e-5
        assert body["usage"]["prompt_tokens"] == len(ids[i]) and body["model"] == MODEL_ID
    # Each line: a hold and a settlement at half the prompt price, naming the line.
    entries = _ledger(coord)
    for i in range(3):
        cause = {"kind": "batch_line", "id": f"{batch.id}/e{i}"}
        mine = [e for e in entries if e["cause"] == cause]
        assert [e["memo"] for e in mine] == ["hold", "settle"], mine
        paid = sum(
            p["amount"] for p in mine[1]["postings"]
            if p["account"].startswith("accrual:") or p["account"] == ledger.FEES
        )  # fmt: skip
        assert paid == ledger.token_cost(len(ids[i]), PRICE.prompt // 2)
    _wait(lambda: len(_audits(coord, nodes["provider"])) == 3)  # probation: every answer
    _wait(lambda: all(a["state"] in DECIDED for a in _audits(coord, nodes["provider"])))
    assert all(a["state"] == "passed" for a in _audits(coord, nodes["provider"]))


def _ledger(coord: CoordinatorThread) -> list[dict]:
    with coord.admin() as c:
        entries: list[dict] = c.get("/api/v1/ledger").json()["entries"]
        return entries
