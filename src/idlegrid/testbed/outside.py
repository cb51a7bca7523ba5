"""A stand-in for the internet and a provider's LAN, for egress tests: a network namespace
behind a veth with an HTTP server on a TEST-NET-3 address (public as far as any egress rule
goes) and on an RFC 1918 one, both routed from the host. Needs root and `ip`."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from idlegrid.testbed.inprocess import wait_until

INTERNET = "203.0.113.2"
LAN = "10.254.77.2"


@dataclass(frozen=True)
class Outside:
    """Where the servers are: `internet` and `lan` URLs of the same HTTP server."""

    port: int

    @property
    def internet(self) -> str:
        """A URL "on the internet"."""
        return f"http://{INTERNET}:{self.port}/"

    @property
    def lan(self) -> str:
        """A URL on the provider's LAN."""
        return f"http://{LAN}:{self.port}/"


def fetch(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of a GET from this process, or None if it failed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except OSError:
        return None


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@contextmanager
def outside(port: int, directory: str = "/usr/share") -> Iterator[Outside]:
    """The namespace, the veth and a server of `directory`; all removed on exit."""
    name = f"igout{os.getpid()}"
    host_if, peer_if = f"{name}a", f"{name}b"
    _ip("netns", "add", name)
    server = None
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _ip("link", "set", peer_if, "netns", name)
        _ip("addr", "add", "203.0.113.1/30", "dev", host_if)
        _ip("addr", "add", "10.254.77.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        for addr in (f"{INTERNET}/30", f"{LAN}/30"):
            _ip("-n", name, "addr", "add", addr, "dev", peer_if)
        _ip("-n", name, "link", "set", peer_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", name, "python3", "-m", "http.server", str(port),
             "--bind", "0.0.0.0", "--directory", directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        out = Outside(port)
        for url in (out.internet, out.lan):  # the host reaches both: a refusal is the rules'
            wait_until(lambda u=url: fetch(u) == 200, 20)
        yield out
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
