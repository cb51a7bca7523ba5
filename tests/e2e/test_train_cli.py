"""`idlegrid up --train` as a real process tree, then `idlegrid train` and `idlegrid job`
as real CLI processes: a verified job trains, is audited and billed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from idlegrid.testbed.inprocess import free_port

pytestmark = pytest.mark.slow
TINY = [
    "--steps",
    "16",
    "--interval",
    "8",
    "--layers",
    "1",
    "--dim",
    "32",
    "--heads",
    "2",
    "--seq",
    "16",
    "--batch",
    "4",
    "--windows",
    "64",
    "--price",
    "0.001",
]


@pytest.fixture
def local_grid(tmp_path: Path) -> Iterator[Path]:
    pytest.importorskip("torch")
    env = {**os.environ, "IDLEGRID_NODE_TIMEOUT_S": "3", "IDLEGRID_HEARTBEAT_INTERVAL_S": "0.5"}
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "idlegrid",
            "up",
            "--data-dir",
            str(tmp_path),
            "--port",
            str(free_port()),
            "--providers",
            "2",
            "--threads",
            "1",
            "--engine",
            "tiny",
            "--model",
            "tiny",
            "--train",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    tick = threading.Event()
    try:
        for _ in range(480):
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            if "idlegrid is up" in (tmp_path / "up.log").read_text():
                break
            tick.wait(0.25)
        else:
            raise TimeoutError((tmp_path / "up.log").read_text())
        yield tmp_path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def _cli(data_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idlegrid", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_idlegrid_train_runs_verified_on_the_local_grid_and_prints_the_bill(
    local_grid: Path,
) -> None:
    done = _cli(local_grid, "train", *TINY, "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)  # --json: nothing but the JSON on stdout
    assert job["state"] == "done" and job["verified_step"] == 16
    assert [x[0] for x in job["losses"]] == list(range(16))
    real = [a for a in job["audits"] if not a["canary"]]
    assert real and all(a["state"] == "passed" for a in real)  # probation: all audited
    assert job["bill"]["charged"] == 16 * 1000 and job["bill"]["refunded"] == 0
    assert job["bill"]["to_providers"] + job["bill"]["fees"] == 16 * 1000

    shown = _cli(local_grid, "job", job["id"])
    assert shown.returncode == 0, shown.stderr
    for part in ("loss curve", "audits", "history", "bill", "every step verified", "passed"):
        assert part in shown.stdout, shown.stdout
    listed = json.loads(_cli(local_grid, "jobs", "--json").stdout)
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    ledger = _cli(local_grid, "verify-ledger")
    assert ledger.returncode == 0, ledger.stdout
