"""What the training shell adds to a job on the grid: per segment, the provider's training
time (the baseline, same run) against the time to build its checkpoint and commit it over
signed HTTP (commitment + checkpoint upload + the coordinator's checks, storage and beacon
draw), and the end-to-end wall time of the job against its training time.

    PYTHONPATH=src python bench/bench_training_shell.py [--steps 64] [--interval 8]

The model is `idlegrid train`'s default (2 layers, width 64, context 32, batch 8). A real
coordinator and two agents (provider, verifier) run in this process on loopback.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from idlegrid.config import CoordinatorSettings
from idlegrid.core.ledger import MICRO
from idlegrid.engines.tiny import TinyEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    device_offer,
    free_port,
    make_agent,
    wait_for_live,
    wait_until,
)


def main() -> None:
    """Run one job and print the shell's share of it."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--interval", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("IDLEGRID_TRAIN_CHALLENGE_S", "1")
    from idlegrid.training.verified import corpus_sha256

    tmp = Path(tempfile.mkdtemp())
    settings = CoordinatorSettings(
        data_dir=tmp,
        database_url=f"sqlite:///{tmp}/c.db",
        port=free_port(),
        heartbeat_interval_s=0.5,
        hw_proofs=False,
        stake_per_device=0,  # the market places the job without a device stake
    )
    coord = CoordinatorThread(settings)
    coord.start()
    provider = make_agent(
        coord.url,
        [TinyEngine("tiny")],
        "provider",
        trainer=True,
        train_threads=1,
        **device_offer(),  # sells a device-hour: the market places the job on it
    )
    verifier = make_agent(
        coord.url, [TinyEngine("tiny")], "verifier", train_verifier=True, train_threads=1
    )
    threads = [AgentThread(provider), AgentThread(verifier)]
    for t in threads:
        t.start()
    wait_for_live(coord.url, 2)
    with coord.admin(timeout=60) as c:  # the operator's client; the job calls send `auth`
        key = c.post("/api/v1/admin/keys", json={"name": "bench"}).json()
        c.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 10 * MICRO, "reference": "bench"},
        )
        for n in c.get("/api/v1/status").json()["nodes"]:
            c.post(
                "/api/v1/admin/mint",
                json={"node_id": n["id"], "amount": 5 * MICRO, "reference": f"bench-{n['id']}"},
            )
        auth = {"Authorization": f"Bearer {key['api_key']}"}
        spec = {
            "dataset": {"ref": "stdlib:v1", "sha256": corpus_sha256(), "windows": 512},
            "model": {"arch": "gpt", "vocab": 256, "seq": 32, "layers": 2, "dim": 64, "heads": 4},
            "batch_size": 8,
            "steps": args.steps,
            "checkpoint_interval": args.interval,
            "price_per_step": 1000,
            "stake_required": 100_000,
        }
        began = time.perf_counter()
        job_id = c.post("/api/v1/jobs", json={"spec": spec}, headers=auth).json()["id"]
        wait_until(
            lambda: c.get(f"/api/v1/jobs/{job_id}", headers=auth).json()["state"] == "done",
            900,
            0.05,
        )
        wall = time.perf_counter() - began
        job = c.get(f"/api/v1/jobs/{job_id}", headers=auth).json()
    for t in threads:
        t.stop(20)
    coord.stop()
    timing = provider.roles.training.timing
    segs = provider.roles.training.segments
    print(
        f"job {job_id}: {args.steps} steps in {segs} segments, "
        f"{len([a for a in job['audits'] if a['state'] == 'passed'])} audits passed"
    )
    print(
        f"provider training     {timing['train_s']:.2f} s ({timing['train_s'] / segs:.3f} "
        "s/segment)"
    )
    print(
        f"checkpoint + commit   {timing['commit_s']:.2f} s ({timing['commit_s'] / segs:.3f} "
        f"s/segment) = {100 * timing['commit_s'] / timing['train_s']:.1f} % of training"
    )
    print(f"job wall (submit→done) {wall:.2f} s = {wall / timing['train_s']:.2f} x training")


if __name__ == "__main__":
    main()
