"""A local grid in one process tree: a coordinator and N provider agents as child processes.

Used by `idlegrid up`, the end-to-end tests and the benchmarks, so all three run the same
real processes on loopback.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from idlegrid.core.ledger import MICRO

GRID_FILE = "grid.json"
KEY_FILE = "api-key"
OPERATOR_KEY_FILE = "operator-key"
LOG_TAIL_LINES = 20


class ProcessExited(RuntimeError):
    """A grid process ended while `up` waited for it; names it and carries its log's tail."""

    def __init__(self, name: str, returncode: int, what: str, log: Path, tail: str) -> None:
        how = (
            f"died with {signal.Signals(-returncode).name}"
            if returncode < 0
            else f"exited with status {returncode}"
        )
        super().__init__(f"{name} {how} before {what}; last lines of {log}:\n{tail}")
        self.name, self.returncode, self.how, self.log, self.tail = name, returncode, how, log, tail


@dataclass
class _Restart:
    backoff: float = 1.0
    due: float | None = None  # when the dead child is started again
    started_at: float = 0.0
    count: int = 0


@dataclass
class LocalGrid:
    """Handles to a running local grid."""

    data_dir: Path
    port: int
    providers: int = 2
    engine: str = "llama.cpp"
    model: str = "gemma3:270m"
    threads: int | None = None
    funding_credits: int = 100
    # Verified training: providers take jobs, the last one re-executes audited segments.
    train: bool = False
    # Inference audits: every provider also verifies the others' answers.
    verify: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    provider_args: Sequence[str] = ()
    # The URL providers dial, when a TLS proxy fronts the coordinator (tests/e2e: nginx).
    provider_url: str | None = None
    log_dir: Path | None = None
    coordinator: subprocess.Popen[bytes] | None = None
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # pid -> process name (its log's)
    _restarts: dict[str, _Restart] = field(default_factory=dict)
    api_key: str = ""
    key_id: str = ""
    operator_key: str = ""

    @property
    def url(self) -> str:
        """Base URL of the coordinator."""
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        # A local grid's training segments that no audit selected are final after a few
        # seconds, not the production window (the demo would otherwise wait on it).
        local = {"IDLEGRID_TRAIN_CHALLENGE_S": "3"} if self.train else {}
        if not self.verify:
            # No verifier on this grid and one operator runs every provider: no probation
            # budget for unverifiable providers (their payouts are still held).
            local["IDLEGRID_TRUST_PROBATION_BUDGET_UCR"] = "-1"
        env = {
            **os.environ,
            **local,
            **self.extra_env,
            "IDLEGRID_OPERATOR_KEY": self.operator_key,
            "IDLEGRID_DASHBOARD_OPEN_ON_LOOPBACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        logs = self.log_dir or self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - closed once the child has it
        out.write(f"---- {name} starting ----\n".encode())
        out.flush()
        # Own session: a terminal's Ctrl-C reaches only `up`, which stops providers before
        # the coordinator so that they can drain. Parent-death signal: if `up` itself is
        # killed, its children still stop instead of serving on as orphans.
        with out:  # the child has its own descriptor from here on
            proc = subprocess.Popen(
                [sys.executable, "-m", "idlegrid", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.names[proc.pid] = name
        return proc

    def _log_path(self, name: str) -> Path:
        return (self.log_dir or self.data_dir / "logs") / f"{name}.log"

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of a process's log, from its latest start."""
        try:
            text = self._log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        latest = text.rsplit(f"---- {name} starting ----\n", 1)[-1]
        return "\n".join(latest.rstrip().splitlines()[-lines:])

    def start_coordinator(self, timeout_s: float = 60.0) -> None:
        """Start the coordinator and wait until it is ready."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        op_file = self.data_dir / OPERATOR_KEY_FILE
        if op_file.exists():
            self.operator_key = op_file.read_text().strip()
        else:
            self.operator_key = secrets.token_urlsafe(24)
            _write_private(op_file, self.operator_key)
        self.coordinator = self._spawn(self._coordinator_args(), "coordinator")
        self._wait(
            lambda c: c.get(f"{self.url}/readyz").status_code == 200,
            timeout_s,
            "coordinator ready",
            self.coordinator,
        )
        # Where the CLI finds this grid: written on every start, since a reused data dir
        # may have held a grid on another port.
        (self.data_dir / GRID_FILE).write_text(json.dumps({"url": self.url}))

    def _coordinator_args(self) -> list[str]:
        # A local grid listens on loopback whatever IDLEGRID_HOST says (the coordinator
        # command honours it, and would refuse a public address without TLS).
        return [
            "coordinator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]

    def _provider_args(self, index: int) -> list[str]:
        threads = self.threads or max(1, (os.cpu_count() or 1) // max(self.providers, 1))
        args = [
            "provide",
            "--coordinator",
            self.provider_url or self.url,
            "--name",
            f"provider-{index}",
            "--engine",
            self.engine,
            "--model",
            self.model,
            "--threads",
            str(threads),
            "--key-file",
            str(self.data_dir / "nodes" / f"provider-{index}.key"),
            *self.provider_args,
        ]
        if self.train:
            if index == self.providers - 1:
                # Priced above the default training ceiling: the market never places a
                # job on the verifier, which would only leave it unclaimed.
                args += ["--train-verifier", "--device-price", "100"]
            else:
                args.append("--train")
        if self.verify:
            args.append("--verify")
        return args

    def start_provider(self, index: int) -> subprocess.Popen[bytes]:
        """Start provider agent number `index`."""
        proc = self._spawn(self._provider_args(index), f"provider-{index}")
        self.agents.append(proc)
        return proc

    def live_nodes(self) -> list[dict[str, object]]:
        """Nodes the coordinator currently counts as live."""
        with httpx.Client(trust_env=False, timeout=10) as c:
            nodes: list[dict[str, object]] = c.get(f"{self.url}/api/v1/status").json()["nodes"]
        return [n for n in nodes if n["live"] and n["state"] == "live"]

    def wait_for_providers(
        self, count: int, timeout_s: float = 600.0, on_poll: Callable[[int], None] | None = None
    ) -> None:
        """Block until `count` providers are registered and live; `on_poll(live)` each look."""

        def enough(_c: httpx.Client) -> bool:
            live = len(self.live_nodes())
            if on_poll:
                on_poll(live)
            return live >= count

        self._wait(enough, timeout_s, f"{count} live providers", *self.agents)

    def wait_for_hwproofs(self, timeout_s: float = 120.0) -> None:
        """Block until every hardware proof issued so far has a verdict (or expired).

        A provider proves its hardware right after registering: seconds of full-core work
        on its side and the judge's on the coordinator's. Benchmarks of steady serving wait
        for that to end, or they measure the proof.
        """
        headers = {"Authorization": f"Bearer {self.operator_key}"}

        def settled(c: httpx.Client) -> bool:
            r = c.get(f"{self.url}/api/v1/hwproofs", headers=headers)
            r.raise_for_status()
            done = ("passed", "failed", "expired", "late")  # a late one's re-try is issued
            return all(p["state"] in done for p in r.json()["proofs"])

        self._wait(settled, timeout_s, "hardware proofs to settle", self.coordinator, *self.agents)

    def fund_consumer(self) -> str:
        """Create (or reuse) the local consumer key, fund it, and write it to the key file."""
        key_file = self.data_dir / KEY_FILE
        headers = {"Authorization": f"Bearer {self.operator_key}"}
        with httpx.Client(base_url=self.url, trust_env=False, timeout=30) as c:
            if key_file.exists():
                secret = key_file.read_text().strip()
                r = c.get("/api/v1/balance", headers={"Authorization": f"Bearer {secret}"})
                if r.status_code == 200:
                    self.api_key, self.key_id = secret, r.json()["key_id"]
                    return secret
            r = c.post("/api/v1/admin/keys", json={"name": "local"}, headers=headers)
            r.raise_for_status()
            self.key_id, self.api_key = r.json()["key_id"], r.json()["api_key"]
            r = c.post(
                "/api/v1/admin/mint",
                headers=headers,
                json={
                    "key_id": self.key_id,
                    "amount": self.funding_credits * MICRO,
                    "reference": f"local-faucet:{self.key_id}",
                },
            )
            r.raise_for_status()
        key_file.unlink(missing_ok=True)
        _write_private(key_file, self.api_key)
        return self.api_key

    def fund_providers(self, credits: int = 20) -> None:
        """Give each local provider enough credits to post its market stake (once)."""
        headers = {"Authorization": f"Bearer {self.operator_key}"}
        with httpx.Client(base_url=self.url, trust_env=False, timeout=30) as c:
            for node in c.get("/api/v1/status", headers=headers).json()["nodes"]:
                c.post(
                    "/api/v1/admin/mint",
                    headers=headers,
                    json={
                        "node_id": node["id"],
                        "amount": credits * MICRO,
                        "reference": f"local-stake-faucet:{node['id']}",
                    },
                ).raise_for_status()
        self.wait_for_stake()

    def wait_for_stake(self, timeout_s: float = 60.0) -> None:
        """Block until every live provider has posted the stake paid inference needs (the
        agents post it from the credits minted above on their next heartbeat)."""
        headers = {"Authorization": f"Bearer {self.operator_key}"}

        def staked(c: httpx.Client) -> bool:
            view = c.get(f"{self.url}/api/v1/status", headers=headers).json()
            need, bal = view.get("inference_stake", 0), view.get("balances", {})
            return all(
                sum(v for a, v in bal.items() if a.startswith(f"stake:{n['id']}:")) >= need
                for n in view["nodes"]
                if n["live"]
            )

        self._wait(staked, timeout_s, "providers staked", *self.agents)

    def start(self, timeout_s: float = 900.0) -> None:
        """Coordinator, providers, funded key: everything `idlegrid up` does."""
        self.start_coordinator()
        for i in range(self.providers):
            self.start_provider(i)
        self.wait_for_providers(self.providers, timeout_s)
        self.fund_consumer()
        self.fund_providers()

    def supervise(self, now: float | None = None) -> list[str]:
        """Restart children that died, each after a backoff; what happened, as lines.

        A provider that dies is started again after 1 s, doubling up to 60 s while it
        keeps dying within a minute of its start; a coordinator that dies is restarted the
        same way (the providers reconnect to it by themselves).
        """
        now = time.monotonic() if now is None else now
        events = []
        procs = [("coordinator", self.coordinator)] + [
            (f"provider-{i}", p) for i, p in enumerate(self.agents)
        ]
        for name, proc in procs:
            if proc is None or proc.poll() is None:
                continue
            restart = self._restarts.setdefault(name, _Restart())
            if restart.due is None:
                if now - restart.started_at > 60.0:
                    restart.backoff = 1.0  # it had been up a while: not a crash loop
                restart.due = now + restart.backoff
                how = (
                    f"died with {signal.Signals(-proc.returncode).name}"
                    if proc.returncode < 0
                    else f"exited with status {proc.returncode}"
                )
                events.append(f"{name} {how}; restarting in {restart.backoff:.0f} s")
                restart.backoff = min(restart.backoff * 2, 60.0)
            elif now >= restart.due:
                restart.due, restart.started_at = None, now
                restart.count += 1
                if name == "coordinator":
                    self.coordinator = self._spawn(self._coordinator_args(), "coordinator")
                else:
                    i = int(name.rsplit("-", 1)[1])
                    self.agents[i] = self._spawn(self._provider_args(i), name)
                events.append(f"{name} restarted (restart {restart.count})")
        return events

    def restarts(self, name: str) -> int:
        """How often `supervise` has restarted a child."""
        r = self._restarts.get(name)
        return r.count if r else 0

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the providers (they drain through the coordinator), then the coordinator."""
        _terminate(self.agents, grace_s)
        _terminate([self.coordinator] if self.coordinator else [], grace_s)

    def _wait(
        self, ready: object, timeout_s: float, what: str, *procs: subprocess.Popen[bytes] | None
    ) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(trust_env=False, timeout=5) as c:
            while time.monotonic() < deadline:
                for p in procs:
                    if p is not None and p.poll() is not None:
                        name = self.names.get(p.pid, f"process {p.pid}")
                        raise ProcessExited(
                            name, p.returncode, what, self._log_path(name), self.log_tail(name)
                        )
                try:
                    if ready(c):  # type: ignore[operator]
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)  # polling a child process's readiness; nothing to wait on
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _die_with_parent() -> None:
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _terminate(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)


def find_grid(coordinator: str | None, data_dir: Path) -> tuple[str, str | None]:
    """Coordinator URL and API key for client commands: flags first, then the local grid."""
    key_file = data_dir / KEY_FILE
    key = key_file.read_text().strip() if key_file.exists() else None
    key = os.environ.get("IDLEGRID_API_KEY", key)
    if coordinator:
        return coordinator.rstrip("/"), key
    grid_file = data_dir / GRID_FILE
    if grid_file.exists():
        return json.loads(grid_file.read_text())["url"], key
    return "http://127.0.0.1:8700", key
