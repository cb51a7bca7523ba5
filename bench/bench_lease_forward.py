"""Port-forward through the relay against a direct loopback copy, each party in its own
process, with the CPU each hop spends.

    PYTHONPATH=src .venv/bin/python bench/bench_lease_forward.py --mb 100 --pairs 5 [--json]

The coordinator, the provider's agent (bwrap runtime: root and bubblewrap needed) and the
consumer's `serve_forward` each run in a process of their own, as on a real grid (three
machines there; here they share this VM's cores). A bulk and an echo server run in the
workspace and, the same script, on the host's loopback; this process reads `--mb` MB from
each, back to back, `--pairs` times: the ratio is the median of the pairs' ratios. Then 50
one-byte echoes each way: the added round trip.

CPU per hop: each process's user + system seconds (from /proc, every thread) over the
forwarded transfers, per 100 MB: the agent, the coordinator, the forwarding client, the
two ends (server, reader) that a direct copy also has, and the relay script in the
sandbox where one runs (an agent that cannot connect into the lease's network itself);
and the direct copy's own. `--perf PREFIX` records the three processes with `perf`
(native frames: kernel, interpreter, memcpy); `BENCH_PROFILE=FILE` runs the
coordinator's loop under cProfile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_lease import SERVER, _client, _listening  # noqa: E402

from idlegrid.config import CoordinatorSettings  # noqa: E402
from idlegrid.core.ledger import MICRO, Price  # noqa: E402
from idlegrid.testbed.inprocess import free_port, wait_until  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def _settings(tmp: Path, port: int) -> CoordinatorSettings:
    return CoordinatorSettings(
        data_dir=tmp, database_url=f"sqlite:///{tmp}/c.db", port=port,
        heartbeat_interval_s=0.5, node_timeout_s=5.0, stake_per_device=0, hw_proofs=False,
    )  # fmt: skip


def _until_stdin_closes() -> None:
    sys.stdin.read()


def role_coordinator(tmp: str, port: str) -> None:
    """Serve the coordinator until stdin closes."""
    from idlegrid.testbed.inprocess import CoordinatorThread

    coord = CoordinatorThread(_settings(Path(tmp), int(port)))
    if os.environ.get("BENCH_PROFILE"):  # the server's loop in this thread, under cProfile
        import cProfile

        def announce() -> None:
            wait_until(lambda: coord.server.started, 30)
            print("ready", flush=True)
            _until_stdin_closes()
            coord.server.should_exit = True

        threading.Thread(target=announce, daemon=True).start()
        cProfile.runctx("coord.server.run()", globals(), locals(), os.environ["BENCH_PROFILE"])
        return
    coord.start()
    print("ready", flush=True)
    _until_stdin_closes()
    coord.stop()


def role_agent(url: str, tmp: str) -> None:
    """Run one bwrap provider until stdin closes."""
    from idlegrid.engines.fake import FakeEngine
    from idlegrid.testbed.inprocess import AgentThread, make_agent

    agent = make_agent(
        url, [FakeEngine("fake:1")], "p1", price=Price(MICRO, 4 * MICRO),
        device_price_h=MICRO, devices=[{"model": "RTX-4090", "count": 1, "vram_gb": 0}],
        workspace_root=Path(tmp) / "ws",
    )  # fmt: skip
    thread = AgentThread(agent)
    thread.start()
    print("ready", flush=True)
    _until_stdin_closes()
    thread.stop()


def role_forward(url: str, key: str, lease: str, *pairs: str) -> None:
    """`idlegrid port-forward` for each LOCAL:REMOTE pair, until stdin closes."""
    from idlegrid.client.lease_cmd import serve_forward

    stop = threading.Event()
    for pair in pairs:
        local, remote = (int(p) for p in pair.split(":"))
        threading.Thread(
            target=serve_forward, args=(url, key, lease, local, remote, stop), daemon=True
        ).start()
    print("ready", flush=True)
    _until_stdin_closes()
    stop.set()


def _spawn(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc


def _cpu_by_pid() -> dict[int, tuple[str, float]]:
    """(command line, CPU seconds so far) of every process."""
    out: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry)] = (cmd, (int(fields[11]) + int(fields[12])) / HZ)
    return out


def _hop(cmd: str, roles: dict[int, str], pid: int) -> str | None:
    if pid in roles:
        return roles[pid]
    if pid == os.getpid():
        return "reader (this process)"
    if "import contextlib, os, socket, sys, threading" in cmd:
        return "workspace helper"
    if "bulk_port" in cmd or "bulk()" in cmd:
        return "server"
    return None


def _perf(prefix: str | None, pids: list[int], n: int) -> subprocess.Popen[bytes] | None:
    """`perf record` of those processes (native frames: where the C time goes) until
    interrupted."""
    if not prefix:
        return None
    pid_list = ",".join(map(str, pids))
    cmd = ["perf", "record", "-q", "-F", "1999", "-o", f"{prefix}.{n}.data", "-p", pid_list]
    perf = subprocess.Popen(cmd)
    time.sleep(0.5)  # perf attaches
    return perf


def main() -> None:
    """Run the measurement and print a table (or JSON)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--perf", help="perf record the three processes into PREFIX.N.data")
    ap.add_argument("--role", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.role:
        role, *rest = args.role
        {"coordinator": role_coordinator, "agent": role_agent, "forward": role_forward}[role](*rest)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-fwd-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[str]] = []
    host: subprocess.Popen[bytes] | None = None
    try:
        procs.append(_spawn("coordinator", str(tmp), str(port)))
        procs.append(_spawn("agent", url, str(tmp)))
        op = _settings(tmp, port).ensure_operator_key()
        with httpx.Client(
            base_url=url, trust_env=False, headers={"authorization": f"Bearer {op}"}
        ) as c:
            key = c.post("/api/v1/admin/keys", json={"name": "bench"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 1000 * MICRO, "reference": "bench"},
            ).raise_for_status()
        api = key["api_key"]
        http = httpx.Client(
            base_url=url, trust_env=False, headers={"authorization": f"Bearer {api}"}
        )
        with http:
            wait_until(lambda: len(http.get("/api/v1/offers").json()["offers"]) == 1, 30)
            order = {"id": "FWD", "kind": "lease", "hours": 1, "resources": {"max_price": 2}}
            http.post("/api/v1/orders", json=order).raise_for_status()
            wait_until(lambda: http.get("/api/v1/leases/FWD").json().get("state") == "running", 60)
            from websockets.sync.client import connect

            with connect(
                "ws" + url[4:] + "/api/v1/leases/FWD/exec",
                additional_headers={"authorization": f"Bearer {api}"},
                proxy=None,
            ) as ws:
                ws.send(
                    json.dumps({"argv": ["python", "-c", SERVER, "9000", "9001", str(args.mb)]})
                )
                ws.recv()
            direct, direct_echo, local, local_echo = (free_port() for _ in range(4))
            host = subprocess.Popen(
                [sys.executable, "-c", SERVER, str(direct), str(direct_echo), str(args.mb)]
            )
            procs.append(_spawn("forward", url, api, "FWD", f"{local}:9000", f"{local_echo}:9001"))
            for p in (direct, direct_echo, local, local_echo):
                wait_until(lambda p=p: _listening(p), timeout_s=10)
            time.sleep(1.0)  # the workspace's servers start (a refused forward would fail)
            roles = {procs[0].pid: "coordinator", procs[1].pid: "agent", procs[2].pid: "client"}
            pairs: list[Any] = []
            spent: dict[str, list[float]] = {}
            direct_cpu: dict[int, list[float]] = {}
            for _ in range(args.pairs):
                at = _cpu_by_pid()
                d = _client(direct, direct_echo, args.mb)
                done = _cpu_by_pid()
                for pid in (os.getpid(), host.pid):
                    base = direct_cpu.setdefault(pid, [0.0] * args.pairs)
                    base[len(pairs)] = done[pid][1] - at[pid][1]
                perf = _perf(args.perf, [p.pid for p in procs], len(pairs))
                before = _cpu_by_pid()
                f = _client(local, local_echo, args.mb)
                after = _cpu_by_pid()
                if perf is not None:
                    perf.send_signal(2)
                    perf.wait()
                pairs.append((d, f))
                for pid, (cmd, cpu) in after.items():
                    hop = _hop(cmd, roles, pid)
                    if hop is not None:
                        row = spent.setdefault(hop, [0.0] * args.pairs)
                        row[len(pairs) - 1] += cpu - before.get(pid, (cmd, 0.0))[1]
            http.post("/api/v1/leases/FWD/end")
    finally:
        if host is not None:
            host.kill()
            host.wait()
        for proc in reversed(procs):
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    ratios = sorted(d[0] / f[0] for d, f in pairs)
    d_s = statistics.median(d[0] for d, _ in pairs)
    f_s = statistics.median(f[0] for _, f in pairs)
    d_rtt = statistics.median(d[1] for d, _ in pairs)
    f_rtt = statistics.median(f[1] for _, f in pairs)
    per100 = 100 / args.mb
    out = {
        "mb": args.mb,
        "pairs": args.pairs,
        "direct_mb_s": round(args.mb / d_s, 1),
        "forwarded_mb_s": round(args.mb / f_s, 1),
        "throughput_ratio": round(statistics.median(ratios), 3),
        "throughput_ratio_min_max": [round(ratios[0], 3), round(ratios[-1], 3)],
        "direct_rtt_ms": round(d_rtt * 1000, 3),
        "forwarded_rtt_ms": round(f_rtt * 1000, 3),
        "added_rtt_ms": round((f_rtt - d_rtt) * 1000, 3),
        # CPU seconds per 100 MB forwarded, per hop (summed over the processes of a hop)
        "cpu_s_per_100mb": {
            hop: round(statistics.median(xs) * per100, 3) for hop, xs in sorted(spent.items())
        },
        "forwarded_s_per_100mb": round(f_s * per100, 3),
        "pids": {role: pid for pid, role in roles.items()},
        # the same for the direct copy: its server and its reader (this process)
        "direct_cpu_s_per_100mb": round(
            statistics.median(sum(xs) for xs in zip(*direct_cpu.values(), strict=True)) * per100,
            3,
        ),
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for k, v in out.items():
        print(f"{k:<26} {v}")


if __name__ == "__main__":
    main()
