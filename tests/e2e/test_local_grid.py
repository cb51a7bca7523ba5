"""`idlegrid up` as a real process tree, the real model, the official openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from idlegrid.core import ledger
from idlegrid.core.ledger import Price, Share
from idlegrid.testbed.inprocess import free_port, wait_until

pytestmark = pytest.mark.slow
MODEL = "gemma3:270m"
PROMPT = "The capital of France is"
FEE_BPS = 200  # the default


class UpProcess:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        env = {**os.environ, "IDLEGRID_NODE_TIMEOUT_S": "3", "IDLEGRID_HEARTBEAT_INTERVAL_S": "0.5"}
        self.log = open(data_dir / "up.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "idlegrid",
                "up",
                "--data-dir",
                str(data_dir),
                "--port",
                str(self.port),
                "--providers",
                "2",
                "--threads",
                "1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 600) -> str:
        key_file = self.data_dir / "api-key"
        tick = threading.Event()
        for _ in range(int(timeout_s / 0.25)):
            assert self.proc.poll() is None, (self.data_dir / "up.log").read_text()
            if key_file.exists() and "idlegrid is up" in (self.data_dir / "up.log").read_text():
                assert key_file.stat().st_mode & 0o777 == 0o600
                return key_file.read_text().strip()
            tick.wait(0.25)
        raise TimeoutError((self.data_dir / "up.log").read_text())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            self.proc.wait(90)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()  # its children follow (parent-death signal)
                self.proc.wait()
            self.log.close()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpProcess, str]]:
    proc = UpProcess(tmp_path_factory.mktemp("grid"))
    try:
        key = proc.wait_ready()
        yield proc, key
    finally:
        proc.stop()
    # Every child is gone after Ctrl-C: nothing holds the port.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{proc.url}/healthz", trust_env=False)


@pytest.fixture(scope="module")
def reference() -> object:
    """The same engine called directly: llama-cpp-python on the same GGUF file."""
    import llama_cpp

    from idlegrid.engines.models import resolve_model

    path = resolve_model(MODEL).gguf_path
    return llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=1, verbose=False)


def direct(llm: object, prompt: str, max_tokens: int) -> str:
    # llama-cpp-python reuses the KV cache of a shared prompt prefix, and that changes
    # greedy output (measured: "staan" vs "mendatang"); the grid evaluates every prompt
    # from scratch, so the reference must too.
    llm.reset()  # type: ignore[attr-defined]
    # OpenAI semantics: llama-cpp-python's default repeat penalty of 1.1 must be turned off.
    out = llm.create_completion(
        prompt,
        max_tokens=max_tokens,
        temperature=0.0,  # type: ignore[attr-defined]
        repeat_penalty=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
    )
    text: str = out["choices"][0]["text"]
    return text


def operator_headers(up: UpProcess) -> dict[str, str]:
    """The grid's operator key (in its data dir): the ledger and every balance."""
    op = (up.data_dir / "operator-key").read_text().strip()
    return {"Authorization": f"Bearer {op}"}


def status(url: str, headers: dict[str, str] | None = None) -> dict[str, object]:
    data: dict[str, object] = httpx.get(
        f"{url}/api/v1/status", headers=headers, trust_env=False
    ).json()
    return data


def balance(url: str, key: str) -> int:
    r = httpx.get(
        f"{url}/api/v1/balance", headers={"Authorization": f"Bearer {key}"}, trust_env=False
    )
    return int(r.json()["balance"])


def provider_balances(url: str) -> dict[str, int]:
    return {n["id"]: n["earned"] for n in status(url)["nodes"]}  # type: ignore[attr-defined, index]


def entries_for(up: UpProcess, cause: str) -> list[dict[str, object]]:
    r = httpx.get(
        f"{up.url}/api/v1/ledger",
        params={"cause": cause},
        headers=operator_headers(up),
        trust_env=False,
    )
    entries: list[dict[str, object]] = r.json()["entries"]
    return entries


def test_completions_match_the_engine_and_credits_move_exactly(
    up: tuple[UpProcess, str], reference: object
) -> None:
    grid, key = up
    client = openai.OpenAI(base_url=f"{grid.url}/v1", api_key=key)
    assert [m.id for m in client.models.list()] == [MODEL]
    want = direct(reference, PROMPT, 32)

    before_c, before_p = balance(grid.url, key), provider_balances(grid.url)
    balances = status(grid.url, operator_headers(grid))["balances"]
    before_fees = balances.get(ledger.FEES, 0)  # type: ignore[attr-defined]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0)
    assert resp.choices[0].text == want
    assert resp.usage is not None
    n_prompt = len(reference.tokenize(PROMPT.encode()))  # type: ignore[attr-defined]
    assert resp.usage.prompt_tokens == n_prompt

    after_p = provider_balances(grid.url)
    gained = {
        n: after_p[n] - before_p.get(n, 0) for n in after_p if after_p[n] != before_p.get(n, 0)
    }
    assert len(gained) == 1
    ((node_id, got),) = gained.items()
    offer = next(n for n in status(grid.url)["nodes"] if n["id"] == node_id)["offers"][MODEL]  # type: ignore[attr-defined, index]
    charge = Share(
        node_id,
        resp.usage.prompt_tokens,
        resp.usage.completion_tokens,
        Price(offer["prompt_price"], offer["output_price"]),
    ).charge()
    fee = charge * FEE_BPS // 10_000
    assert charge > 0
    assert before_c - balance(grid.url, key) == charge
    assert got == charge - fee
    balances = status(grid.url, operator_headers(grid))["balances"]
    assert balances.get(ledger.FEES, 0) - before_fees == fee  # type: ignore[attr-defined]

    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want


def test_chat_streaming_and_plain(up: tuple[UpProcess, str], reference: object) -> None:
    grid, key = up
    client = openai.OpenAI(base_url=f"{grid.url}/v1", api_key=key)
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
    )
    text = plain.choices[0].message.content or ""
    assert text.strip()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    # The base GGUF ships no template; the grid supplies Gemma's, and then matches the engine.
    rendered = "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    assert text == direct(reference, rendered, 16)


def test_n_choices_prompt_lists_models_and_refused_fields(
    up: tuple[UpProcess, str], reference: object
) -> None:
    grid, key = up
    with openai.OpenAI(base_url=f"{grid.url}/v1", api_key=key) as client:
        assert client.models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gemma3:nope")
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                prediction={"type": "content", "content": "Hi"},
            )
        assert refused.value.param == "prediction"

        before = balance(grid.url, key)
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=42, n=3
        )
        resp = raw.parse()
        one = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=42
        )
        listed = client.completions.create(
            model=MODEL, prompt=[PROMPT, "The sky is"], max_tokens=8, temperature=0
        )
    texts = [c.text for c in resp.choices]
    assert [c.index for c in resp.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts[0] == one.choices[0].text  # choice 0 keeps the request's seed
    assert resp.usage is not None and one.usage is not None
    assert resp.usage.prompt_tokens == 3 * one.usage.prompt_tokens
    tasks = raw.headers["x-idlegrid-tasks"].split(",")
    paid = 0
    for task_id in tasks:  # three grid tasks, each held and settled on its own
        entries = entries_for(grid, task_id)
        assert [e["memo"] for e in entries] == ["hold", "settle"]
        paid -= sum(
            p["amount"]
            for e in entries
            for p in e["postings"]  # type: ignore[attr-defined]
            if str(p["account"]).startswith("consumer:")
        )
    assert paid > 0
    assert [c.text for c in listed.choices] == [
        direct(reference, PROMPT, 8),
        direct(reference, "The sky is", 8),
    ]
    assert before - balance(grid.url, key) > paid  # the n=1 and list requests cost too


def test_status_json_lists_the_providers(up: tuple[UpProcess, str]) -> None:
    grid, _ = up
    out = subprocess.run(
        [sys.executable, "-m", "idlegrid", "status", "--json", "--data-dir", str(grid.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout)
    names = sorted(n["name"] for n in data["nodes"] if n["live"])
    assert names == ["provider-0", "provider-1"]
    assert all(n["decode_tps"] > 0 and n["prefill_tps"] > 0 for n in data["nodes"])
    assert data["me"]["balance"] > 0


def test_local_providers_stake_and_a_lease_is_placed(up: tuple[UpProcess, str]) -> None:
    grid, key = up
    base = [sys.executable, "-m", "idlegrid", "--data-dir", str(grid.data_dir), "--json"]

    def cli(*args: str) -> dict[str, object]:
        cmd = [base[0], base[1], base[2], args[0], *base[3:], *args[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def staked() -> bool:
        offers = cli("offers")["offers"]
        return len(offers) == 2 and all(o["staked"] for o in offers)  # type: ignore[index]

    wait_until(staked, timeout_s=60, interval_s=0.5)
    order = grid.data_dir / "lease.json"
    order.write_text(
        json.dumps(
            {
                "id": "e2e-lease",
                "kind": "lease",
                "hours": 1,
                "resources": {"accelerators": ["CPU"], "max_price": 0.1},
            }
        )
    )
    placed = cli("orders", "--submit", str(order))
    assert placed["state"] == "active"
    assert cli("explain", "e2e-lease")["placement"]["legs"][0]["offer_id"].endswith("/CPU")  # type: ignore[index]
    assert cli("cancel", "e2e-lease")["state"] == "cancelled"


def _pid_of(name: str, data_dir: Path) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"provide" in cmd and name.encode() in cmd and str(data_dir).encode() in b" ".join(cmd):
            return int(entry.name)
    raise LookupError(name)


def test_killing_the_serving_provider_mid_stream(up: tuple[UpProcess, str]) -> None:
    grid, key = up
    client = openai.OpenAI(base_url=f"{grid.url}/v1", api_key=key, max_retries=0)
    before = balance(grid.url, key)
    stream = client.completions.create(
        model=MODEL,
        prompt="Here is a long list of European cities:\n1.",
        max_tokens=160,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks, pieces, victim = [], 0, None
    for chunk in stream:
        chunks.append(chunk)
        pieces += bool(chunk.choices and chunk.choices[0].text)
        if victim is None and pieces >= 4:
            holder = next(n for n in status(grid.url)["nodes"] if n["running"])  # type: ignore[attr-defined]
            victim = _pid_of(holder["name"], grid.data_dir)
            os.kill(victim, signal.SIGKILL)
    assert victim is not None
    usage = chunks[-1].usage
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert usage is not None and finish in ("length", "stop")
    if finish == "length":
        assert usage.completion_tokens == 160
    request_id = chunks[0].id
    assert [e["memo"] for e in entries_for(grid, request_id)] == ["hold", "settle"]
    settle = entries_for(grid, request_id)[1]
    consumer = next(
        p
        for p in settle["postings"]  # type: ignore[attr-defined]
        if p["account"].startswith("consumer:")
    )
    spent = before - balance(grid.url, key)
    assert spent > 0
    # Charged once: the hold came back minus exactly what the settlement paid out.
    paid_out = sum(
        p["amount"]
        for p in settle["postings"]  # type: ignore[attr-defined]
        if p["account"].startswith(("accrual:", "provider:", "system:fees"))
    )
    assert spent == paid_out
    assert consumer["amount"] > 0  # the unused part of the hold was refunded
    # `idlegrid up` supervises its children: the killed provider comes back by itself.
    name = holder["name"]  # type: ignore[index]
    log_path = grid.data_dir / "up.log"
    wait_until(lambda: f"{name} restarted" in log_path.read_text(), 120)
    assert f"{name} died with SIGKILL; restarting" in log_path.read_text()
    wait_until(
        lambda: (
            sum(
                1
                for n in status(grid.url)["nodes"]  # type: ignore[attr-defined]
                if n["live"] and n["name"] == name
            )
            == 1
        ),
        180,
    )
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert again.usage is not None and again.usage.completion_tokens > 0
