"""A WAN in network namespaces: K hosts, per-pair bandwidth, user-space latency.

Each host is a namespace with one veth (`eth0`) into a hub namespace holding a bridge, so
nothing touches the root namespace's network. Host k's egress gets an htb qdisc with one
class per destination at `bandwidth_mbps[k][j]` (u32 match on the destination address):
per-pair, direction-dependent bandwidth, the way DT-FM's tc script shaped per destination.
The kernel here has no netem, so latency is added by `comm.transport` when it delivers a
message. Needs root, `ip` and `tc`.

`python -m idlegrid.testbed.wan` runs the planner-vs-random comparison and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from idlegrid.core.planner import CostModel, parse_topology, plan_topology
from idlegrid.core.planner.scenarios import world_link

PORT = 29517
SRC = Path(__file__).resolve().parents[2]


def available() -> str | None:
    """None if this machine can run the testbed, else why not."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class RunMeasurement:
    """Iterations per second of one placement, the loss, bytes each host sent."""

    its_per_s: float
    losses: list[float]
    bytes_sent: int


class WanTestbed:
    """K namespaces with shaped links; use as a context manager."""

    def __init__(
        self, latency_ms: list[list[float]], bandwidth_mbps: list[list[float]], subnet: int = 77
    ) -> None:
        self.k = len(latency_ms)
        self.latency_ms, self.bandwidth_mbps = latency_ms, bandwidth_mbps
        self.prefix = f"ig{os.getpid() % 100000}"
        self.subnet = subnet
        self.namespaces: list[str] = []

    def ip(self, k: int) -> str:
        """Address of host k."""
        return f"10.{self.subnet}.0.{k + 1}"

    def __enter__(self) -> WanTestbed:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        hub = f"{self.prefix}hub"
        _sh("ip", "netns", "add", hub)
        self.namespaces.append(hub)
        _sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", hub, "link", "set", "br0", "up")
        for k in range(self.k):
            ns = f"{self.prefix}h{k}"
            _sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _sh(
                "ip",
                "-n",
                hub,
                "link",
                "add",
                f"v{k}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _sh("ip", "-n", hub, "link", "set", f"v{k}", "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.ip(k)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            tc = ("ip", "netns", "exec", ns, "tc")
            _sh(*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1")
            # unclassified traffic (ARP) is not shaped
            _sh(
                *tc,
                "class",
                "add",
                "dev",
                "eth0",
                "parent",
                "1:",
                "classid",
                "1:1",
                "htb",
                "rate",
                "10gbit",
            )
            for j in range(self.k):
                if j == k:
                    continue
                rate = f"{max(1, round(self.bandwidth_mbps[k][j] * 1000))}kbit"
                _sh(
                    *tc,
                    "class",
                    "add",
                    "dev",
                    "eth0",
                    "parent",
                    "1:",
                    "classid",
                    f"1:{j + 10}",
                    "htb",
                    "rate",
                    rate,
                    "ceil",
                    rate,
                )
                _sh(
                    *tc,
                    "filter",
                    "add",
                    "dev",
                    "eth0",
                    "parent",
                    "1:",
                    "protocol",
                    "ip",
                    "prio",
                    "1",
                    "u32",
                    "match",
                    "ip",
                    "dst",
                    f"{self.ip(j)}/32",
                    "flowid",
                    f"1:{j + 10}",
                )

    def close(self) -> None:
        """Delete every namespace this testbed made (their veths go with them)."""
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()

    def train(
        self,
        plan: list[list[int]],
        *,
        compression: dict[str, Any] | None = None,
        steps: int = 6,
        warmup: int = 2,
        micro_batches: int = 8,
        micro_batch: int = 4,
        model: dict[str, int] | None = None,
        seed: int = 0,
        timeout: float = 300.0,
    ) -> RunMeasurement:
        """Run real pipeline training with this placement; iterations/s after warm-up."""
        cfg = {
            "addresses": [[self.ip(k), PORT] for k in range(self.k)],
            "latency_s": [[v / 1e3 for v in row] for row in self.latency_ms],
            "plan": plan,
            "model": model or {"seq": 32, "layers": 4, "dim": 48, "heads": 4},
            "micro_batches": micro_batches,
            "micro_batch": micro_batch,
            "steps": steps,
            "samples": 256,
            "seed": seed,
            "lr": 2e-3,
            "compression": compression or {"method": "none"},
            "secret": secrets.token_hex(32),
        }
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(cfg, f)
        procs = []
        try:
            for k in range(self.k):
                cmd = [
                    "ip",
                    "netns",
                    "exec",
                    f"{self.prefix}h{k}",
                    sys.executable,
                    "-m",
                    "idlegrid.training.distributed",
                    f.name,
                    str(k),
                ]
                procs.append(
                    subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
                    )
                )
            for p in procs:  # every host listens before any connects
                line = p.stdout.readline() if p.stdout else ""
                if line.strip() != "READY":
                    raise RuntimeError(f"a host failed to start: {line!r}")
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("GO\n")
                p.stdin.flush()
            results = []
            for p in procs:
                out, _ = p.communicate(timeout=timeout)
                if p.returncode != 0:
                    raise RuntimeError(f"a host exited with {p.returncode}")
                results.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            os.unlink(f.name)
        rates = [(steps - warmup) / (r["times"][-1] - r["times"][warmup - 1]) for r in results]
        last = [r["losses"] for r in results if r["losses"]]  # one per pipeline
        losses = [float(np.mean(step)) for step in zip(*last, strict=True)]
        return RunMeasurement(
            float(np.median(rates)), losses, sum(r["bytes_sent"] for r in results)
        )


# A world-wide-like 8-host grid: 4 of DT-FM Case 5's cities, 2 hosts each, links scaled
# down 200× (2 Gbit/s → 10 Mbit/s) so that a tiny CPU model is as communication-bound
# per micro-batch as GPT3-XL on V100s was.
TESTBED_CITIES = ["Oregon", "Virginia", "Frankfurt", "Tokyo"]
BANDWIDTH_SCALE = 1 / 200


def world_topology(tflops: float = 0.02) -> dict[str, Any]:
    """The testbed grid as a planner topology (tiny GPT, fp32 on the wire)."""
    regions = [c for c in TESTBED_CITIES for _ in range(2)]
    n = len(regions)
    lat = [[0.0] * n for _ in range(n)]
    bw = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            ms, gbps = world_link(regions[i], regions[j])
            lat[i][j], bw[i][j] = ms, gbps * BANDWIDTH_SCALE
    return {
        "devices": [{"id": f"h{k}", "region": r, "tflops": tflops} for k, r in enumerate(regions)],
        "latency_ms": lat,
        "bandwidth_gbps": bw,
        "model": {
            "layers": 4,
            "hidden": 48,
            "seq": 32,
            "batch": 64,
            "micro_batch": 4,
            "dtype": "fp32",
            "grad_dtype": "fp32",
            "vocab": 256,
            "mfu": 1.0,
        },
        "stages": 4,
        "data_parallel": 2,
        "objective": "full",
    }


def compare(steps: int = 6, seed: int = 0, compression: bool = True) -> dict[str, Any]:
    """Planner vs random placement on the testbed: measured it/s and modelled seconds."""
    raw = world_topology()
    topo = parse_topology(raw)
    model = CostModel(topo)
    bits = {"activation_bits": 4, "backward_bits": 8, "gradient_bits": 8}
    model_aq = CostModel(parse_topology({**raw, "compression": bits}))
    planned = plan_topology(
        topo, seconds=1e9, evaluations=3000, seed=seed, clock=time.monotonic
    ).plan.matrix()
    rand = np.random.default_rng(seed + 1).permutation(topo.n).reshape(4, 2)
    mbps = [[g * 1000 for g in row] for row in raw["bandwidth_gbps"]]
    runs: dict[str, Any] = {}
    aq: dict[str, Any] = {"method": "aqsgd", "fwd_bits": 4, "bwd_bits": 8, "grad_bits": 8}
    variants: list[tuple[str, Any, dict[str, Any] | None]] = [
        ("planner", planned, None),
        ("random", rand, None),
    ]
    if compression:
        variants += [("planner+aqsgd", planned, aq), ("random+aqsgd", rand, aq)]
    with WanTestbed(raw["latency_ms"], mbps) as bed:
        for name, plan, comp in variants:
            m = bed.train(plan.tolist(), compression=comp, steps=steps)
            # the model sees 4/8/8 bits for AQ-SGD runs (first visits in fp32 aside)
            modelled = (model_aq if comp else model).full_parts(plan)["total"]
            runs[name] = {
                "plan": plan.tolist(),
                "its_per_s": m.its_per_s,
                "modelled_s": modelled,
                "loss": m.losses[-1],
                "bytes": m.bytes_sent,
            }
    return runs


def main() -> None:
    """Print the planner-vs-random comparison on the namespace testbed."""
    ap = argparse.ArgumentParser(description="planner vs random on a namespace WAN")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    why = available()
    if why:
        sys.exit(f"testbed unavailable: {why}")
    runs = compare(args.steps, args.seed)
    print("| placement | it/s measured | modelled s/it | last loss | bytes sent |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        print(
            f"| {name} | {r['its_per_s']:.3f} | {r['modelled_s']:.2f} | {r['loss']:.3f} | "
            f"{r['bytes']} |"
        )
    ratio = runs["planner"]["its_per_s"] / runs["random"]["its_per_s"]
    print(f"\nplanner ÷ random it/s: {ratio:.2f}×")


if __name__ == "__main__":
    main()
