"""Workspace egress through the user-space NAT (slirp4netns, docs/leases.md "Egress"):
download throughput and TCP connect time from inside a bwrap workspace, against the same
download from the host in the same run (the workspace's time includes starting its
sandbox for the exec), and what egress adds to creating a workspace.

    PYTHONPATH=src .venv/bin/python bench/bench_egress.py [--mb 100] [--rounds 3] [--json]

The "internet" is a network namespace behind a veth (`idlegrid.testbed.outside`) with
Python's http.server; curl fetches a random file of `--mb` MB. Root, bubblewrap,
slirp4netns and iptables needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from idlegrid.agent.workspace import open_runtime
from idlegrid.agent.workspace.base import Limits, WorkspaceSpec
from idlegrid.config import default_data_dir
from idlegrid.testbed.outside import outside


def main() -> None:
    """Measure and print one line per number (or JSON)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-egress-"))
    served = tmp / "www"
    served.mkdir()
    (served / "blob").write_bytes(os.urandom(args.mb << 20))
    served.chmod(0o755)
    rt = open_runtime("bwrap", tmp / "ws", secrets=[default_data_dir()])
    limits = Limits(cpus=2, memory_bytes=1 << 30, pids=64)
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{time_connect} %{size_download}"]
    out: dict[str, float] = {}
    with outside(18000 + os.getpid() % 1000, str(served)) as net:
        url = net.internet + "blob"
        host, inside, connect, made = [], [], [], {}
        for on in (False, True):
            t = time.perf_counter()
            w = rt.create(WorkspaceSpec(f"bench-{int(on)}", limits, egress=on))
            made[on] = time.perf_counter() - t
            if not on:
                w.wipe()
        try:
            for _ in range(args.rounds):
                t = time.perf_counter()
                subprocess.run(curl + [url], check=True, capture_output=True)
                host.append(time.perf_counter() - t)
                t = time.perf_counter()
                code, o, e = w.exec([*curl, url]).run(300)
                inside.append(time.perf_counter() - t)
                assert code == 0 and o.split()[1] == str(args.mb << 20).encode(), (o, e)
            for _ in range(20):
                code, o, _ = w.exec([*curl, net.internet]).run(60)
                connect.append(float(o.split()[0]) * 1000)
        finally:
            w.wipe()
            shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "host_MBps": args.mb / statistics.median(host),
        "workspace_MBps": args.mb / statistics.median(inside),
        "ratio": statistics.median(host) / statistics.median(inside),
        "connect_ms_median": statistics.median(connect),
        "create_s_without_egress": made[False],
        "create_s_with_egress": made[True],
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:26} {v:.3f}")


if __name__ == "__main__":
    main()
