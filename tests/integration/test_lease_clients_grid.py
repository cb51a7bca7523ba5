"""The consumer's clients against a lease, as a user runs them. `idlegrid shell LEASE`
driven through a real PTY (pexpect): the CLI puts its terminal in raw mode, so a command
runs, a resize of the local terminal reaches the workspace's PTY, Ctrl-C interrupts a
sleeping process there, and `exit 7` is the CLI's exit code. Ctrl-C on `idlegrid exec`
reaches the command's Python (its KeyboardInterrupt handler runs, its exit code is the
CLI's). `exec_stream` (behind `exec`,
`cp`, `shell`) carries a stream busy both ways. A grid of its own (the fixture of
test_leases_grid, one instance per module)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pexpect
import pytest
from test_leases_grid import Grid, _order, _wait_state, grid  # noqa: F401

from idlegrid.client.lease_cmd import chunks, exec_stream

pytestmark = pytest.mark.slow


def test_the_shell_cli_on_a_real_pty_runs_resizes_and_interrupts(
    grid: Grid,  # noqa: F811
    tmp_path: Path,
) -> None:
    _order(grid, "S1", "RTX-4090")
    _wait_state(grid, "S1", "running")
    env = {**os.environ, "IDLEGRID_API_KEY": grid.keys[0][1], "NO_COLOR": "1"}
    argv = ["-m", "idlegrid.client.cli", "shell", "S1"]
    argv += ["--coordinator", grid.url, "--data-dir", str(tmp_path)]
    child = pexpect.spawn(
        sys.executable, argv, env=env, encoding="utf-8", timeout=20, dimensions=(24, 80)
    )
    try:
        # Keys typed before the raw mode and the remote bash are up would be lost.
        child.expect_exact("$ ")
        # Computed answers: the typed line echoes "6*7", only the shell prints "42".
        child.send("echo $((6*7))\r")
        child.expect_exact("42")
        child.setwinsize(33, 101)  # SIGWINCH for the CLI, which sends the new size on
        child.send("stty size\r")
        child.expect_exact("33 101")
        # The process that says it sleeps is the one that sleeps: Ctrl-C cannot land
        # between two commands of a list (where bash would let it pass).
        child.send(
            "python -c \"import time; print('sle' + 'eping', flush=True); time.sleep(100)\"\r"
        )
        child.expect_exact("sleeping\r\n")
        child.sendcontrol("c")  # a raw terminal: the byte goes to the remote PTY
        child.send("echo $((40+3))\r")
        child.expect_exact("43", timeout=10)  # not after 100 s: the sleep was interrupted
        child.send("exit 7\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 7, (child.exitstatus, child.signalstatus)
    with grid.http() as c:
        c.post("/api/v1/leases/S1/end").raise_for_status()
    _wait_state(grid, "S1", "ended")


def test_exec_carries_megabytes_of_stdin_echoed_while_they_are_sent(grid: Grid) -> None:  # noqa: F811
    # `cat` answers as it reads: both directions are busy at once for the whole transfer,
    # far past what the window, the pipes and the sockets hold.
    _order(grid, "S2", "RTX-4090")
    _wait_state(grid, "S2", "running")
    sent = os.urandom(24 << 20)
    got = bytearray()
    code = exec_stream(
        grid.url, grid.keys[0][1], "S2", {"argv": ["cat"]},
        stdin=chunks(sent), on_output=lambda fd, d: got.extend(d),
    )  # fmt: skip
    assert code == 0
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(sent).hexdigest()
    with grid.http() as c:
        c.post("/api/v1/leases/S2/end").raise_for_status()
    _wait_state(grid, "S2", "ended")


def test_ctrl_c_on_exec_reaches_the_workload_and_its_exit_code_is_the_clis(
    grid: Grid,  # noqa: F811
    tmp_path: Path,
) -> None:
    _order(grid, "S3", "RTX-4090")
    _wait_state(grid, "S3", "running")
    env = {**os.environ, "IDLEGRID_API_KEY": grid.keys[0][1], "NO_COLOR": "1"}
    source = (
        "import sys, time\n"
        "try:\n"
        "    print('re' + 'ady', flush=True)\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(3)\n"
    )
    argv = ["-m", "idlegrid.client.cli", "exec", "--coordinator", grid.url]
    argv += ["--data-dir", str(tmp_path), "S3", "--", "python", "-c", source]
    child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", timeout=20)
    try:
        child.expect_exact("ready")
        child.sendintr()  # Ctrl-C on the CLI's terminal: SIGINT for the CLI, passed on
        child.expect_exact("interrupted")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3, (child.exitstatus, child.signalstatus)
    with grid.http() as c:
        c.post("/api/v1/leases/S3/end").raise_for_status()
    _wait_state(grid, "S3", "ended")
