"""Lease workspace start-up on this machine: `create` (disk image, mkfs, mount, cgroup,
venv) until the first command's first output byte, the "shell prompt" proxy. Target ≤ 5 s.
Needs root and bubblewrap (the bwrap runtime refuses otherwise, saying why).

    PYTHONPATH=src python bench/bench_workspace.py [--runs 7] [--disk-gb 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from idlegrid.agent.workspace import open_runtime
from idlegrid.agent.workspace.base import Limits, WorkspaceSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--disk-gb", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    limits = Limits(cpus=2, memory_bytes=4 << 30, pids=1024, disk_bytes=int(args.disk_gb * 2**30))
    with tempfile.TemporaryDirectory() as root:
        rt = open_runtime("bwrap", Path(root))
        first, create, wipe = [], [], []
        for i in range(args.runs):
            t0 = time.perf_counter()
            ws = rt.create(WorkspaceSpec(f"bench-{i}", limits))
            t1 = time.perf_counter()
            ex = ws.exec(["/bin/sh", "-c", "echo prompt$ ; exec python -c 'print(1)'"])
            next(ex.chunks())
            t2 = time.perf_counter()
            ex.run()
            ws.wipe()
            t3 = time.perf_counter()
            create.append(t1 - t0)
            first.append(t2 - t0)
            wipe.append(t3 - t2)
    out = {
        "runs": args.runs,
        "disk_gb": args.disk_gb,
        "create_to_first_output_s_median": round(statistics.median(first), 3),
        "create_to_first_output_s_max": round(max(first), 3),
        "create_s_median": round(statistics.median(create), 3),
        "exec_first_output_s_median": round(
            statistics.median(first) - statistics.median(create), 3
        ),
        "wipe_s_median": round(statistics.median(wipe), 3),
        "target_s": 5.0,
    }
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
