"""Outbound network for a workspace, egress only: a user-space NAT into the lease's network
namespace, with the provider's own machine and LAN blocked inside that namespace.

`slirp4netns` gives the namespace a `tap0` (10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3)
and turns its packets into ordinary sockets of a process on the host: the outside sees the
provider's address, nothing listens inbound. `--disable-host-loopback` stops 10.0.2.2 from
reaching the host's 127.0.0.1 (the coordinator's operator routes, the agent). The rest of
the provider is still a socket away (its LAN, its own non-loopback addresses, a cloud's
metadata service), so the namespace's own firewall rejects those destinations
(`iptables` in the lease's namespace, which belongs to the host's root user namespace: the
workload, an unprivileged uid in a user namespace of its own, cannot change it). Rejected:
RFC 1918, CGNAT 100.64/10, link-local 169.254/16 (metadata), 0/8, loopback, multicast and
reserved, the slirp gateway, and every address the host has when the workspace is made;
only the slirp DNS forwarder is let through. No IPv6 (slirp4netns's is off).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
from pathlib import Path

from idlegrid.errors import SandboxUnavailable

DNS = "10.0.2.3"
GATEWAY = "10.0.2.2"
RESOLV_CONF = f"nameserver {DNS}\n"
BLOCKED = (
    "0.0.0.0/8",
    "10.0.0.0/8",  # includes the slirp network: its gateway is the host
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local: a cloud's metadata service
    "172.16.0.0/12",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved and broadcast
)
READY_S = 10.0


def available() -> str | None:
    """Why egress cannot be given here, or None when it can."""
    for tool in ("slirp4netns", "iptables", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt install slirp4netns iptables)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing"
    return None


def host_addresses() -> list[str]:
    """The host's own IPv4 addresses now (each interface's), from `ip -4 -o addr`."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            found.append(str(ipaddress.ip_interface(parts[parts.index("inet") + 1]).ip))
    return sorted(set(found))


def rules(own: list[str]) -> list[list[str]]:
    """The iptables commands for the namespace's OUTPUT chain, in order (pure)."""
    out = [["-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"]]
    for proto in ("udp", "tcp"):
        out.append(["-A", "OUTPUT", "-d", DNS, "-p", proto, "--dport", "53", "-j", "ACCEPT"])
    reject = ["-j", "REJECT", "--reject-with", "icmp-net-prohibited"]
    for net in (*BLOCKED, *(f"{a}/32" for a in own)):
        out.append(["-A", "OUTPUT", "-d", net, *reject])
    return out


class Egress:
    """A running slirp4netns for one lease's namespace, and its firewall."""

    def __init__(self, proc: subprocess.Popen[bytes], lifeline: int) -> None:
        self.proc = proc
        # The write end of the NAT's --exit-fd: it exits when this closes, so an agent that
        # dies (even by SIGKILL) leaves no NAT behind.
        self.lifeline = lifeline

    @classmethod
    def start(cls, netns: Path, lease: str, log: Path) -> Egress:
        """Firewall the namespace first, then connect it: no packet leaves unfiltered.
        The NAT's messages go to `log`."""
        why = available()
        if why is not None:
            raise SandboxUnavailable("bwrap", f"outbound network: {why}")
        for rule in rules(host_addresses()):
            _ns(netns, ["iptables", "-w", *rule])
        read, write = os.pipe()
        exit_r, lifeline = os.pipe()
        os.set_inheritable(lifeline, False)
        err_file = open(log, "ab")  # noqa: SIM115 - the child holds it; closed right after
        try:
            proc = subprocess.Popen(
                ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
                 "--enable-sandbox", "--enable-seccomp", f"--ready-fd={write}",
                 f"--exit-fd={exit_r}", "--netns-type=path", str(netns), "tap0"],
                stdin=subprocess.DEVNULL, stdout=err_file, stderr=err_file,
                pass_fds=(write, exit_r), start_new_session=True,
            )  # fmt: skip
            os.close(write)
            write = -1
            ready = _read_with_deadline(read, READY_S)
        except BaseException:
            os.close(lifeline)
            raise
        finally:
            err_file.close()
            os.close(exit_r)
            if write >= 0:
                os.close(write)
            os.close(read)
        nat = cls(proc, lifeline)
        if ready != b"1":
            nat.stop()
            err = log.read_text(errors="replace")[-1000:]
            raise SandboxUnavailable("bwrap", f"slirp4netns did not come up for {lease}: {err}")
        return nat

    def stop(self) -> None:
        """End the NAT (the namespace then has `lo` only, and goes with its last process)."""
        if self.lifeline >= 0:
            os.close(self.lifeline)  # the NAT exits on its own
            self.lifeline = -1
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def _ns(netns: Path, argv: list[str]) -> None:
    r = subprocess.run(
        ["nsenter", f"--net={netns}", "--", *argv], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise SandboxUnavailable("bwrap", f"outbound network: {' '.join(argv)}: {r.stderr}")


def _read_with_deadline(fd: int, timeout: float) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 1) if ready else b""
