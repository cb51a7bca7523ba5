"""Egress, egress only, with the real sandbox and a real user-space NAT (slirp4netns): a
workspace with egress reaches a server "on the internet" (in a network namespace of its own
behind a veth, at a TEST-NET-3 address that no rule blocks) but not the provider: neither
its loopback (directly or through the NAT's gateway), nor its own non-loopback addresses,
nor its LAN (an RFC 1918 server reachable from the host); without egress a workspace has
`lo` only. Nothing skips: a machine without slirp4netns, iptables or root fails here."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from idlegrid.agent.workspace import egress, open_runtime
from idlegrid.agent.workspace.base import Limits, WorkspaceSpec
from idlegrid.agent.workspace.bwrap import BwrapRuntime, BwrapWorkspace
from idlegrid.config import default_data_dir
from idlegrid.testbed.inprocess import wait_until
from idlegrid.testbed.outside import Outside, fetch
from idlegrid.testbed.outside import outside as outside_net

pytestmark = pytest.mark.slow  # real sandboxes and a NAT per workspace: about 10 s

PORT = 18000 + os.getpid() % 1000


@pytest.fixture(scope="module")
def outside() -> Iterator[Outside]:
    with outside_net(PORT) as out:
        yield out


@pytest.fixture(scope="module")
def host_server() -> Iterator[int]:
    """An HTTP server on every host address (0.0.0.0): loopback and the host's own."""
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> BwrapRuntime:
    rt = open_runtime("bwrap", tmp_path_factory.mktemp("ws"), secrets=[default_data_dir()])
    assert isinstance(rt, BwrapRuntime)
    return rt


def _make(rt: BwrapRuntime, lease: str, on: bool) -> BwrapWorkspace:
    limits = Limits(cpus=1, memory_bytes=256 << 20, pids=64)
    return rt.create(WorkspaceSpec(lease, limits, egress=on))


GET = """
import sys, urllib.request
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            print(url, r.status)
    except Exception as e:
        print(url, "ERR", type(e).__name__, e)
"""


def get(w: BwrapWorkspace, *urls: str) -> dict[str, str]:
    """Each URL fetched from inside the workspace: its status, or ERR and why."""
    code, out, err = w.exec(["python", "-c", GET, *urls]).run(60)
    assert code == 0, err
    return {u: rest for u, _, rest in (line.partition(" ") for line in out.decode().splitlines())}


def test_egress_reaches_the_internet_and_nothing_of_the_provider(
    runtime: BwrapRuntime, outside: Outside, host_server: int
) -> None:
    own = [a for a in egress.host_addresses() if not a.startswith("127.")]
    assert own, "the host has a non-loopback address to test"
    assert all(fetch(f"http://{a}:{host_server}/") == 200 for a in own)
    w = _make(runtime, "egress-on", True)
    try:
        seen = get(
            w,
            outside.internet,
            outside.lan,
            f"http://127.0.0.1:{host_server}/",
            f"http://{egress.GATEWAY}:{host_server}/",
            *(f"http://{a}:{host_server}/" for a in own),
        )
        assert seen.pop(outside.internet) == "200"
        # The LAN, the host's loopback (itself and through the NAT's gateway) and the host's
        # own addresses: all refused, though the host reaches every one of them.
        assert seen and all(v.startswith("ERR") for v in seen.values()), seen
        # The workload cannot lift the rules: the namespace's firewall is not its to change.
        code, _, _ = w.exec(["iptables", "-F", "OUTPUT"]).run(30)
        assert code != 0
        assert get(w, outside.lan)[outside.lan].startswith("ERR")
        nat = w.egress
        assert nat is not None and nat.proc.poll() is None
    finally:
        w.wipe()
    assert nat.proc.poll() is not None  # the wipe ended the NAT


def test_the_nat_exits_when_its_lifeline_closes(runtime: BwrapRuntime) -> None:
    # What an agent killed with SIGKILL leaves: its end of the --exit-fd pipe closed.
    w = _make(runtime, "egress-orphan", True)
    try:
        nat = w.egress
        assert nat is not None
        os.close(nat.lifeline)
        nat.lifeline = -1
        wait_until(lambda: nat.proc.poll() is not None, 10)
    finally:
        w.wipe()


def test_without_egress_there_is_no_network_at_all(runtime: BwrapRuntime, outside: Outside) -> None:
    w = _make(runtime, "egress-off", False)
    try:
        assert w.egress is None
        code, out, _ = w.exec(["cat", "/proc/net/dev"]).run(30)
        ifaces = {line.split(":")[0].strip() for line in out.decode().splitlines()[2:]}
        assert (code, ifaces) == (0, {"lo"})
        assert get(w, outside.internet)[outside.internet].startswith("ERR")
    finally:
        w.wipe()


def test_port_forward_still_reaches_the_workspace_with_egress_on(
    runtime: BwrapRuntime, outside: Outside
) -> None:
    w = _make(runtime, "egress-fwd", True)
    try:
        server = w.exec(["python", "-m", "http.server", "8123", "--bind", "127.0.0.1"])

        def answered() -> bytes:
            conn = w.connect(8123)
            assert conn is not None  # the lease has a namespace the agent enters
            try:
                conn.write(b"GET / HTTP/1.0\r\n\r\n")
                conn.close_stdin()
                return b"".join(data for s, data in conn.chunks() if s == "stdout")
            finally:
                conn.wait()

        wait_until(lambda: answered().startswith(b"HTTP/1.0 200"), 20, 0.1)
        server.signal()
        server.wait(10)
    finally:
        w.wipe()


def test_the_rules_block_private_link_local_and_own_addresses() -> None:
    rules = egress.rules(["192.0.2.2"])
    rejected = [r[3] for r in rules if "REJECT" in r]
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8"):
        assert net in rejected
    assert "192.0.2.2/32" in rejected
    accepted = [r for r in rules if r[-1] == "ACCEPT"]
    assert all(r[3] == egress.DNS for r in accepted[1:])  # only lo and the NAT's DNS first
    assert rules.index(accepted[-1]) < min(i for i, r in enumerate(rules) if "REJECT" in r)


def test_stage_names_the_nats_dns(runtime: BwrapRuntime) -> None:
    w = _make(runtime, "egress-dns", True)
    try:
        code, out, _ = w.exec(["cat", "/etc/resolv.conf"]).run(30)
        assert (code, out.decode()) == (0, egress.RESOLV_CONF)
    finally:
        w.wipe()
    assert Path(runtime.root / "egress-dns").exists() is False
