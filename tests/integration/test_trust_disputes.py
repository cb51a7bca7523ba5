"""Disputes, audit expiry and failover parts on a real loopback grid (tiny engines, real
agents over HTTP, the openai client).

A dispute is opened with the provider's own signed request; every later step (bisection
rounds, the referee's recompute) is answered by the agents themselves from their heartbeat.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Cause, Posting, Price
from idlegrid.core.trust import commitment as cm
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.tiny import TinyEngine
from idlegrid.protocol.signing import NodeKey
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
    wait_until,
)

STAKE = 50 * MICRO
CHEAP, DEAR = Price(10 * MICRO, 40 * MICRO), Price(1000 * MICRO, 4000 * MICRO)


class Grid:
    """A coordinator and named agents, with the helpers the tests share."""

    def __init__(self, tmp_path: Path, fee_bps: int = 2000) -> None:
        settings = CoordinatorSettings(
            data_dir=tmp_path,
            database_url=f"sqlite:///{tmp_path}/c.db",
            port=free_port(),
            fee_bps=fee_bps,
            heartbeat_interval_s=0.3,
            node_timeout_s=3.0,
            long_poll_s=2.0,
        )
        self.coord = CoordinatorThread(settings)
        self.coord.start()
        self.url = self.coord.url
        self.agents: dict[str, AgentThread] = {}
        self.ids: dict[str, str] = {}
        with self.admin() as c:
            self.key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": self.key["key_id"], "amount": 100 * MICRO, "reference": "m"},
            )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=30)

    def admin(self) -> httpx.Client:
        """A client with the operator key: admin routes, audits, the ledger, every balance."""
        return self.coord.admin(timeout=30)

    @property
    def services(self) -> Any:
        return self.coord.app.state.services

    def add(self, name: str, engine: Any, price: Price, verifier: bool = False, **kw: Any) -> None:
        """Start an agent and give it a stake."""
        agent = make_agent(self.url, [engine], name, price=price, verifier=verifier, **kw)
        t = AgentThread(agent)
        t.start()
        self.agents[name] = t
        wait_for_live(
            self.url, sum(1 for x in self.agents.values() if x.thread and x.thread.is_alive())
        )
        with self.http() as c:
            nodes = {n["name"]: n["id"] for n in c.get("/api/v1/status").json()["nodes"]}
        self.ids[name] = nodes[name]
        acct = ledger.stake_account(nodes[name], "cpu")
        self.move(f"stake:{name}", ledger.ISSUER, acct, STAKE)

    def panel(self, *engines: Any) -> list[str]:
        """Three verifiers for the dispute panel (honest unless an engine is given), joined
        after the audit so that none of them could have taken it: with exactly k = 3
        eligible, the panel is all of them."""
        names = ["referee", "p2", "p3"]
        for name, engine in zip(names, [*engines, *([None] * 3)], strict=False):
            self.add(name, engine or TinyEngine("tiny"), DEAR, verifier=True)
        return [self.ids[n] for n in names]

    def move(self, key: str, src: str, dst: str, amount: int) -> None:
        """A test's own ledger entry: `amount` from `src` to `dst`."""
        self.services.store.post(
            ledger.make_entry(
                key, Cause("test", key), [Posting(src, -amount), Posting(dst, amount)]
            )
        )

    def fee(self, audit: dict) -> int:
        """What one panelist of the majority is paid for `audit`'s dispute: the audit fee of
        the request's charge."""
        from idlegrid.coordinator.trust.tables import TrustCommitment

        with self.services.store.read() as s:
            com = s.get(TrustCommitment, (audit["task_id"], audit["attempt"]))
            assert com is not None
            return int(self.services.trust.fee(com.charge))

    def entry(self, key: str) -> dict:
        (e,) = [e for e in self.entries() if e["key"] == key]
        return e

    def ejected(self) -> tuple[set[str], set[str], set[str]]:
        """Who is ejected: in the coordinator's cache, in the store's rows, in the status."""
        from idlegrid.coordinator.trust.tables import TrustNode

        with self.services.store.read() as s:
            rows = {n.node_id for n in s.query(TrustNode).all() if n.ejected}
        nodes = self.status()["trust"]["nodes"]
        return (
            set(self.services.ctx.ejected),
            rows,
            {n for n, v in nodes.items() if v["ejected"]},
        )

    def books_ok(self) -> None:
        assert self.services.store.verify_ledger() == []
        assert sum(self.status()["balances"].values()) == 0

    def status(self) -> dict:
        with self.admin() as c:
            return c.get("/api/v1/status").json()

    def audits(self) -> list[dict]:
        with self.admin() as c:
            return c.get("/api/v1/audits").json()["audits"]

    def disputes(self) -> list[dict]:
        with self.admin() as c:
            return c.get("/api/v1/disputes").json()["disputes"]

    def entries(self) -> list[dict]:
        with self.admin() as c:
            return c.get("/api/v1/ledger").json()["entries"]

    def complete(self, prompt: str, max_tokens: int = 24, **kw: Any) -> Any:
        client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.key["api_key"], max_retries=0
        )
        # A fixed seed: the answer (and where it could end) is the same every run.
        return client.completions.create(
            model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=1.0, seed=3, **kw
        )

    def signed(
        self, name: str, path: str, body: dict, *, nonce: str | None = None, tamper: bool = False
    ) -> httpx.Response:
        """A request signed with agent `name`'s key, as its agent would send it."""
        key: NodeKey = self.agents[name].agent.client.key
        raw = json.dumps(body).encode()
        headers = key.sign_headers("POST", path, raw, now=time.time(), nonce=nonce)
        if tamper:
            raw = raw.replace(b"}", b', "x": 1}')
        with self.http() as c:
            return c.post(path, content=raw, headers=headers)

    def stop(self) -> None:
        for t in reversed(list(self.agents.values())):
            if t.thread is not None and t.thread.is_alive():
                t.stop(10)
        self.coord.stop()


@pytest.fixture
def grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Grid]:
    monkeypatch.setenv("IDLEGRID_TRUST_CANARY_RATE", "0")
    monkeypatch.setenv("IDLEGRID_TRUST_DISPUTE_ANSWER_S", "20")
    monkeypatch.setenv("IDLEGRID_TRUST_AUDIT_EXPIRY_S", "1.5")
    g = Grid(tmp_path, fee_bps=getattr(request, "param", 2000))
    yield g
    g.stop()


DISPUTES = "/api/v1/disputes"  # the one route family, both kinds


def opening(audit: dict, **kw: Any) -> dict:
    """The body that opens an inference dispute over `audit`."""
    return {"kind": "inference", "audit_id": audit["id"], **kw}


def _failed_audit(g: Grid, provider: str) -> dict:
    """Serve one request and wait until its (probation) audit is judged failed."""
    g.complete("Tell me about item 7")
    wait_until(lambda: any(a["state"] in ("passed", "failed") for a in g.audits()), 90)
    (audit,) = [a for a in g.audits() if a["node_id"] == g.ids[provider]]
    assert audit["state"] == "failed", audit
    return audit


def _settled(g: Grid) -> dict:
    wait_until(lambda: g.disputes() and g.disputes()[0]["state"] in ("won", "lost"), 90)
    return g.disputes()[0]


def _won_against_the_liar(g: Grid, audit: dict, panel: list[str], d: dict) -> None:
    """Everything a panel's ruling for an honest provider against the liar promises."""
    assert d["state"] == "won" and d["ruling"]["provider_right"], d
    assert "unpaid" not in d["ruling"], d
    assert d["kind"] == "inference" and d["challenger_id"] == g.ids["liar"]
    assert sorted(d["panel"]) == sorted(panel)
    assert d["votes"] == {p: "provider" for p in panel}
    assert sorted(d["ruling"]["paid"]) == sorted(panel)
    assert d["ruling"]["slashed"] == "challenger"
    assert d["ruling"]["position"] == d["positions"] - 2  # the last chunk, not the finish claim
    st = g.status()
    bal = st["balances"]
    assert bal[ledger.stake_account(g.ids["provider"], "cpu")] == STAKE  # slash reversed
    assert bal.get(ledger.stake_account(g.ids["liar"], "cpu"), 0) == 0  # liar penalised
    fee = g.fee(audit)
    assert fee > 0
    pay = g.entry(f"panel-pay:{d['id']}")
    credited = {p["account"]: p["amount"] for p in pay["postings"] if p["amount"] > 0}
    # Each of the majority is paid the audit fee, by the liar's stake (the pool untouched).
    assert credited == {ledger.provider_account(p): fee for p in panel}
    debited = {p["account"]: p["amount"] for p in pay["postings"] if p["amount"] < 0}
    assert debited == {ledger.stake_account(g.ids["liar"], "cpu"): -3 * fee}
    for p in panel:
        assert bal.get(ledger.provider_account(p), 0) == fee
    nodes = st["trust"]["nodes"]
    assert not nodes[g.ids["provider"]]["ejected"] and nodes[g.ids["provider"]]["failed"] == 0
    assert nodes[g.ids["liar"]]["ejected"] and nodes[g.ids["liar"]]["verifier_failed"] == 1
    cache, rows, shown = g.ejected()
    assert cache == rows == shown == {g.ids["liar"]}
    assert [a["state"] for a in g.audits() if a["id"] == audit["id"]] == ["overturned"]
    keys = [e["key"] for e in g.entries()]
    assert f"reverse:{d['id']}" in keys
    (penalty,) = [k for k in keys if k.startswith(f"dispute-penalty:{d['id']}:")]
    assert penalty == f"dispute-penalty:{d['id']}:{ledger.stake_account(g.ids['liar'], 'cpu')}"
    g.books_ok()


# 2000 bps: a fee pool that could pay a referee; 200 bps (the default 2%): one that cannot,
# where the old referee pay failed with 402 on every pass and the dispute never settled.
@pytest.mark.parametrize("grid", [2000, 200], indirect=True, ids=["fee20pct", "fee2pct"])
def test_honest_provider_wins_against_a_lying_verifier(grid: Grid) -> None:
    g = grid
    assert g.services.settings.fee_bps in (2000, 200)
    g.add("provider", TinyEngine("tiny"), CHEAP)
    g.add("liar", cheats.FalseAccuser("tiny"), DEAR, verifier=True)
    audit = _failed_audit(g, "provider")
    st = g.status()
    assert st["trust"]["nodes"][g.ids["provider"]]["ejected"]  # probation: first fail ejects
    assert st["balances"].get(ledger.stake_account(g.ids["provider"], "cpu"), 0) == 0
    panel = g.panel()
    r = g.signed("provider", DISPUTES, opening(audit, reason="honest"))
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == "inference" and r.json()["id"].startswith("dsp-")
    d = _settled(g)
    assert d["rounds"] and all(x["agree"] for x in d["rounds"])  # the lie is in the last chunk
    _won_against_the_liar(g, audit, panel, d)
    st = g.status()
    assert st["trust"]["disputes"][0]["provider_right"] is True  # shown by `idlegrid status`
    # The ruling is final: disputing again is a conflict, and nothing moves.
    bal = st["balances"]
    again = g.signed("provider", DISPUTES, opening(audit))
    assert again.status_code == 409
    assert g.status()["balances"] == bal


def _lost_to_the_honest_verifier(g: Grid, audit: dict, before: dict, d: dict) -> None:
    """A cheat's dispute lost: the slash stands, the verifier keeps everything, the panel's
    majority is paid by the cheat."""
    assert d["state"] == "lost" and d["ruling"]["provider_right"] is False, d
    assert "unpaid" not in d["ruling"], d
    assert d["ruling"]["slashed"] is None
    st = g.status()
    bal = st["balances"]
    assert bal.get(ledger.stake_account(g.ids["provider"], "cpu"), 0) == 0
    verifier = g.ids["verifier"]
    assert bal[ledger.stake_account(verifier, "cpu")] == STAKE  # loses nothing
    assert bal.get(ledger.provider_account(verifier), 0) == before.get(
        ledger.provider_account(verifier), 0
    )
    nodes = st["trust"]["nodes"]
    assert nodes[g.ids["provider"]]["ejected"] and not nodes[verifier]["ejected"]
    assert nodes[verifier]["verifier_failed"] == 0
    cache, rows, shown = g.ejected()
    assert cache == rows == shown == {g.ids["provider"]}
    assert [a["state"] for a in g.audits() if a["id"] == audit["id"]] == ["failed"]
    keys = [e["key"] for e in g.entries()]
    assert f"reverse:{d['id']}" not in keys
    assert not any(k.startswith(f"dispute-penalty:{d['id']}") for k in keys)
    # The majority is paid the audit fee each, by the cheat (its account, then its stakes,
    # the fee pool last); nothing else moved.
    fee = g.fee(audit)
    majority = sorted(d["ruling"]["paid"])
    pay = g.entry(f"panel-pay:{d['id']}")
    credited = {p["account"]: p["amount"] for p in pay["postings"] if p["amount"] > 0}
    assert credited == {ledger.provider_account(p): fee for p in majority}
    debited = {p["account"] for p in pay["postings"] if p["amount"] < 0}
    assert debited <= {ledger.provider_account(g.ids["provider"]), ledger.FEES}
    moved = {a for a in set(before) | set(bal) if before.get(a, 0) != bal.get(a, 0)}
    assert moved <= {*debited, *credited}
    for p in majority:
        assert bal[ledger.provider_account(p)] - before.get(ledger.provider_account(p), 0) == fee
    g.books_ok()


def test_cheat_loses_its_dispute_and_the_slash_stands(grid: Grid) -> None:
    g = grid
    g.add("provider", cheats.Invented("tiny"), CHEAP)
    g.add("verifier", TinyEngine("tiny"), DEAR, verifier=True)
    audit = _failed_audit(g, "provider")
    panel = g.panel()
    before = g.status()["balances"]
    r = g.signed("provider", DISPUTES, opening(audit, reason="no"))
    assert r.status_code == 200, r.text
    d = _settled(g)
    assert d["votes"] == {p: "challenger" for p in panel}
    assert sorted(d["ruling"]["paid"]) == sorted(panel)
    _lost_to_the_honest_verifier(g, audit, before, d)


def test_one_colluding_panelist_cannot_overturn_an_honest_verdict(grid: Grid) -> None:
    g = grid
    g.add("provider", cheats.Invented("tiny"), CHEAP)
    g.add("verifier", TinyEngine("tiny"), DEAR, verifier=True)
    audit = _failed_audit(g, "provider")
    panel = g.panel(cheats.Colluder("tiny"))  # "referee" is bribed: it always sides with us
    colluder, honest = panel[0], panel[1:]
    before = g.status()["balances"]
    r = g.signed("provider", DISPUTES, opening(audit, reason="my friend will vouch"))
    assert r.status_code == 200, r.text
    d = _settled(g)
    # It voted (the panel waited for all three), for the provider, and was outvoted.
    assert d["votes"] == {colluder: "provider", **{p: "challenger" for p in honest}}, d
    assert sorted(d["ruling"]["paid"]) == sorted(honest)
    assert d["ruling"]["detail"].startswith("panel 2 of 3")
    _lost_to_the_honest_verifier(g, audit, before, d)
    # The minority is neither paid nor slashed.
    bal = g.status()["balances"]
    assert bal.get(ledger.provider_account(colluder), 0) == 0
    assert bal[ledger.stake_account(colluder, "cpu")] == STAKE


def test_a_silent_verifier_is_judged_by_the_panel_at_its_last_disputed_position(
    grid: Grid,
) -> None:
    g = grid
    g.add("provider", TinyEngine("tiny"), CHEAP)
    g.add("liar", cheats.FalseAccuser("tiny"), DEAR, verifier=True)
    audit = _failed_audit(g, "provider")
    panel = g.panel()
    g.agents["liar"].kill()  # gone: it will answer no query
    knobs = g.services.trust.settings
    knobs.dispute_answer_s = 2.0  # the first round's deadline, fixed when it opens
    r = g.signed("provider", DISPUTES, opening(audit))
    assert r.status_code == 200, r.text
    knobs.dispute_answer_s = 20.0  # the panel's, set when it is seated: time to recompute
    d = _settled(g)
    # Silence did not decide it (nobody is slashed by a deadline): the first round lapsed
    # and the panel recomputed the last position the liar disputed, where it lied.
    assert d["rounds"] and d["rounds"][-1]["agree"] is None, d["rounds"]
    assert all(x["agree"] for x in d["rounds"][:-1])
    assert "panel 3 of 3" in d["ruling"]["detail"]
    _won_against_the_liar(g, audit, panel, d)


def test_an_unpayable_ruling_stays_open_and_settles_once_funds_exist(grid: Grid) -> None:
    g = grid
    g.add("provider", TinyEngine("tiny"), CHEAP)
    g.add("liar", cheats.FalseAccuser("tiny"), DEAR, verifier=True)
    audit = _failed_audit(g, "provider")
    panel = g.panel()
    # The loser (the liar) holds nothing and neither does the fee pool: nobody can pay the
    # panel, so the ruling cannot be written.
    liar_stake = ledger.stake_account(g.ids["liar"], "cpu")
    fees = g.status()["balances"].get(ledger.FEES, 0)
    g.move("drain:stake", liar_stake, ledger.ISSUER, STAKE)
    if fees:
        g.move("drain:fees", ledger.FEES, ledger.ISSUER, fees)
    bal = g.status()["balances"]
    assert bal.get(liar_stake, 0) == 0 and bal.get(ledger.FEES, 0) == 0
    r = g.signed("provider", DISPUTES, opening(audit))
    assert r.status_code == 200, r.text
    wait_until(lambda: bool(g.disputes()[0]["ruling"].get("unpaid")), 90)
    (d,) = g.disputes()
    # Every vote is in and stays; nothing of the ruling was written.
    assert d["state"] == "refereeing" and d["votes"] == {p: "provider" for p in panel}, d
    assert "its ruling needs" in d["ruling"]["unpaid"], d["ruling"]
    assert "provider_right" not in d["ruling"] and d["done_at"] == 0
    keys = [e["key"] for e in g.entries()]
    assert not any(d["id"] in k for k in keys), keys
    assert [a["state"] for a in g.audits() if a["id"] == audit["id"]] == ["failed"]
    nodes = g.status()["trust"]["nodes"]
    assert not nodes[g.ids["liar"]]["ejected"] and nodes[g.ids["liar"]]["verifier_failed"] == 0
    # Nobody is ejected in memory who is not in the store: the liar is not, yet.
    cache, rows, shown = g.ejected()
    assert cache == rows == shown == {g.ids["provider"]}
    assert g.status()["balances"] == bal
    g.books_ok()
    # Funds exist again: the next supervisor pass settles it, in full.
    g.move("refill:stake", ledger.ISSUER, liar_stake, STAKE)
    d = _settled(g)
    _won_against_the_liar(g, audit, panel, d)


def test_dispute_refusals(grid: Grid, tmp_path: Path) -> None:
    g = grid
    g.add("provider", TinyEngine("tiny"), CHEAP, key_dir=tmp_path)
    g.add("verifier", TinyEngine("tiny"), DEAR, verifier=True)
    g.complete("Tell me about item 9")
    wait_until(lambda: any(a["state"] == "passed" for a in g.audits()), 90)
    (audit,) = g.audits()
    assert audit["id"].startswith("aud-")
    before = g.status()["balances"]
    passed = g.signed("provider", DISPUTES, opening(audit, reason="why not"))
    assert passed.status_code == 409 and "did not fail" in passed.json()["error"]["message"]
    # The provider's CLI says the same, signed with the node key on disk: with the kind
    # given, and with the kind told from the audit id (aud-…).
    from typer.testing import CliRunner

    from idlegrid.client.cli import app

    for kind in (["--kind", "inference"], []):
        res = CliRunner().invoke(
            app,
            [
                "dispute",
                audit["id"],
                *kind,
                "--coordinator",
                g.url,
                "--key-file",
                str(tmp_path / "provider.key"),
            ],
        )
        assert res.exit_code == 1 and "did not fail" in res.output, res.output
    # An id that tells no kind needs --kind; a kind the coordinator does not know is refused.
    res = CliRunner().invoke(
        app,
        ["dispute", "x-1", "--coordinator", g.url, "--key-file", str(tmp_path / "provider.key")],
    )
    assert res.exit_code == 1 and "--kind" in res.output, res.output
    res = CliRunner().invoke(
        app,
        [
            "dispute",
            audit["id"],
            "--kind",
            "bogus",
            "--coordinator",
            g.url,
            "--key-file",
            str(tmp_path / "provider.key"),
        ],
    )
    assert res.exit_code == 1 and "kind" in res.output, res.output
    # Another node's audit: not found (no existence leak through the error kind).
    assert g.signed("verifier", DISPUTES, opening(audit)).status_code == 404
    nosuch = {"kind": "inference", "audit_id": "aud-nosuch"}
    assert g.signed("provider", DISPUTES, nosuch).status_code == 404
    # The wrong kind looks in the other game's table: no such audit there.
    assert g.signed("provider", DISPUTES, opening(audit) | {"kind": "training"}).status_code == 404
    # A kind that is no kind, or none: 400 naming `kind`.
    for body in (opening(audit) | {"kind": "bogus"}, {"audit_id": audit["id"]}):
        r = g.signed("provider", DISPUTES, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "kind", r.text
    tampered = g.signed("provider", DISPUTES, opening(audit, reason="x"), tamper=True)
    assert tampered.status_code == 401 and "signature" in tampered.json()["error"]["message"]
    first = g.signed("provider", DISPUTES, opening(audit), nonce="r" * 16)
    replay = g.signed("provider", DISPUTES, opening(audit), nonce="r" * 16)
    assert first.status_code == 409
    assert replay.status_code == 401 and "replay" in replay.json()["error"]["message"]
    with g.http() as c:
        assert c.post(DISPUTES, json=opening(audit)).status_code == 401  # unsigned
        bad = g.signed("provider", DISPUTES, opening(audit, reason="x" * 600))
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "reason"
        # Queries and answers of a dispute that does not exist, or not this node's turn.
        assert g.signed("provider", f"{DISPUTES}/dsp-x/query", {"round": 1}).status_code == 404
        assert g.signed("provider", f"{DISPUTES}/nothing/query", {"round": 1}).status_code == 404
        assert g.signed("provider", f"{DISPUTES}/dsp-x/answer", {"round": 0}).status_code == 400
    assert g.disputes() == [] and g.status()["balances"] == before


class StallingVerifier(TinyEngine):
    """Takes an audit and sits on it until released (a verifier that went quiet)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.release = threading.Event()
        self.taken = threading.Event()

    def audit(self, *a: Any, **kw: Any) -> Any:
        self.taken.set()
        self.release.wait(60)
        return super().audit(*a, **kw)


def test_an_expired_audit_goes_to_another_verifier(grid: Grid) -> None:
    g = grid
    staller = StallingVerifier("tiny")
    g.add("provider", TinyEngine("tiny"), CHEAP)
    g.add("staller", staller, DEAR, verifier=True)
    try:
        g.complete("Tell me about item 11")
        assert staller.taken.wait(90)
        # Lapsed, and nobody else can take it: pending and visible, never passed or failed.
        wait_until(lambda: g.audits()[0]["expired"] == [g.ids["staller"]], 60)
        (audit,) = g.audits()
        assert audit["state"] == "pending" and audit["verifier_id"] is None
        assert g.status()["trust"]["pending_audits"] == {"pending": 1}
        assert g.status()["trust"]["nodes"][g.ids["staller"]]["verifier_expired"] == 1
        g.add("second", TinyEngine("tiny"), DEAR, verifier=True)
        wait_until(lambda: g.audits()[0]["state"] == "passed", 90)
        (audit,) = g.audits()
        assert audit["verifier_id"] == g.ids["second"]
    finally:
        staller.release.set()
    # A late report is refused (the audit is someone else's now), and the late verifier is
    # never paid for it.
    late = g.signed("staller", f"/api/v1/audits/{audit['id']}/report", {"report": ""})
    assert late.status_code in (400, 409)
    bal = g.status()["balances"]
    assert bal.get(ledger.provider_account(g.ids["staller"]), 0) == 0
    assert bal.get(ledger.provider_account(g.ids["second"]), 0) > 0
    assert not any(
        e["key"] == f"audit-pay:{audit['id']}"
        and any(p["account"] == ledger.provider_account(g.ids["staller"]) for p in e["postings"])
        for e in g.entries()
    )


class SlowTiny(TinyEngine):
    """The tiny engine at a human-visible pace, so a drain lands mid-answer."""

    def generate(self, prompt_ids: Any, params: SamplingParams) -> Any:
        tick = threading.Event()
        for t in super().generate(prompt_ids, params):
            tick.wait(0.04)  # simulated compute time per token, not synchronisation
            yield t


def test_each_part_of_a_failover_answer_is_committed_and_audited(grid: Grid) -> None:
    g = grid
    g.add("first", SlowTiny("tiny"), CHEAP, drain_grace_s=0.0)
    g.add("second", TinyEngine("tiny"), Price(100 * MICRO, 400 * MICRO))
    g.add("verifier", TinyEngine("tiny"), DEAR, verifier=True)
    stream = g.complete("A long story about item 3", max_tokens=40, stream=True)
    text, stopper = [], None
    for chunk in stream:
        text.append(chunk.choices[0].text if chunk.choices else "")
        if stopper is None and len("".join(text)) >= 6:
            stopper = threading.Thread(target=g.agents["first"].stop, args=(10,))
            stopper.start()  # drain: the first provider hands the rest on
    assert stopper is not None
    stopper.join(15)
    wait_until(
        lambda: (
            len(g.audits()) >= 2 and all(a["state"] in ("passed", "failed") for a in g.audits())
        ),
        40,
    )
    audits = sorted(g.audits(), key=lambda a: a["attempt"])
    assert [(a["attempt"], a["node_id"]) for a in audits] == [
        (1, g.ids["first"]),
        (2, g.ids["second"]),
    ]
    assert all(a["state"] == "passed" for a in audits), audits
    # The second part was committed over the context that includes the first part.
    store = g.coord.app.state.services.store
    from idlegrid.coordinator.trust.tables import TrustCommitment

    with store.read() as s:
        parts = {
            c.attempt: (c.part, list(c.prior_ids), cm.decode(c.blob))
            for c in s.query(TrustCommitment).all()
        }
    delivered = store.get_task(audits[0]["task_id"]).delivered_ids
    assert parts[1][0] and not parts[2][0]
    # Part 1 commits exactly the tokens the second provider continued from.
    assert parts[2][1] and parts[1][2].tokens == parts[2][1] == delivered[: len(parts[2][1])]
    assert parts[2][2].header.context_hash != parts[1][2].header.context_hash
