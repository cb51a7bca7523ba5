"""Signals sent to a bwrap exec reach its workload, as a terminal's Ctrl-C would, with the
workload's own exit code; another exec of the lease is untouched; SIGKILL ends a command and
what it left in the background. Real sandboxes and real processes, this test process
playing the agent (needs what test_workspace_bwrap.py needs: root, bubblewrap, cgroups)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from idlegrid.agent.workspace.base import Execution, Limits, WorkspaceSpec, killed_by
from idlegrid.agent.workspace.bwrap import BwrapRuntime, BwrapWorkspace
from idlegrid.agent.workspace.marks import MARK, new_mark, signal_marked
from idlegrid.testbed import sandboxes
from idlegrid.testbed.inprocess import wait_until

pytestmark = pytest.mark.slow  # real sandboxes: a few seconds

INTERRUPTIBLE = (  # `ready` inside the try: a signal may come as soon as it is read
    "import sys, time\n"
    "try:\n"
    "    print('ready', flush=True)\n"
    "    time.sleep(60)\n"
    "except KeyboardInterrupt:\n"
    "    print('interrupted', flush=True)\n"
    "    sys.exit(3)\n"
)
# Counts the SIGINTs it gets; says how many on SIGTERM.
COUNTER = (
    "import signal, sys, time\n"
    "n = 0\n"
    "def count(*_):\n"
    "    global n\n"
    "    n += 1\n"
    "def report(*_):\n"
    "    print(n, flush=True)\n"
    "    sys.exit(4)\n"
    "signal.signal(signal.SIGINT, count)\n"
    "signal.signal(signal.SIGTERM, report)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)
TRAPS = "trap 'echo got-{0}; exit {1}' {0}; echo ready; while :; do sleep 0.1; done"


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BwrapWorkspace]:
    mktemp = tmp_path_factory.mktemp
    agent = sandboxes.agent_dir(mktemp("agent-data"))
    runtime: BwrapRuntime = sandboxes.bwrap_runtime(mktemp("workspaces"), mktemp("wheels"), agent)
    w = runtime.create(WorkspaceSpec("signals", Limits(cpus=1, memory_bytes=256 << 20, pids=64)))
    try:
        yield w
    finally:
        w.wipe()


def started(ex: Execution) -> Iterator[tuple[str, bytes]]:
    """The command's output after its first line, which must be `ready`."""
    out = ex.chunks()
    assert next(out) == ("stdout", b"ready\n")
    return out


def test_sigint_reaches_python_whose_handler_keeps_its_exit_code_and_no_other_exec(
    ws: BwrapWorkspace,
) -> None:
    other = ws.exec(["python", "-c", COUNTER])
    rest = started(other)
    ex = ws.exec(["python", "-c", INTERRUPTIBLE])
    out = started(ex)
    ex.signal(signal.SIGINT)
    assert [d for s, d in out if s == "stdout"] == [b"interrupted\n"] and ex.wait(10) == 3
    # Unhandled, Python's KeyboardInterrupt ends it by SIGINT: 130, as a shell reports it.
    ex = ws.exec(["python", "-c", "import time; print('ready', flush=True); time.sleep(60)"])
    out = started(ex)
    ex.signal(signal.SIGINT)
    assert b"KeyboardInterrupt" in b"".join(d for s, d in out if s == "stderr")
    code = ex.wait(10)
    assert code == 130 and killed_by(code) == signal.SIGINT
    other.signal(signal.SIGTERM)  # the other exec of the lease got none of those SIGINTs
    assert [d for s, d in rest if s == "stdout"] == [b"0\n"] and other.wait(10) == 4


def test_a_term_trap_runs_and_sigkill_ends_the_command_and_its_background_child(
    ws: BwrapWorkspace,
) -> None:
    ex = ws.exec(["/bin/sh", "-c", TRAPS.format("TERM", 5)])
    out = started(ex)
    ex.signal(signal.SIGTERM)
    assert [d for s, d in out if s == "stdout"] == [b"got-TERM\n"] and ex.wait(10) == 5
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
        ex = ws.exec(["/bin/sh", "-c", TRAPS.format(sig.name[3:], 6)])
        out = started(ex)
        ex.signal(sig)
        assert [d for s, d in out if s == "stdout"] == [f"got-{sig.name[3:]}\n".encode()]
        assert ex.wait(10) == 6
    ex = ws.exec(["/bin/sh", "-c", "sleep 1000 & echo ready; sleep 1000"])
    started(ex)
    assert len(ws.cgroup.pids()) >= 2
    ex.signal()
    assert killed_by(ex.wait(10)) == signal.SIGKILL
    wait_until(lambda: ws.cgroup.pids() == [], timeout_s=5)
    # Sent while the sandbox is still being built, a signal ends the command as it would
    # have ended the command itself (no handler yet): it is not lost.
    ex = ws.exec(["sleep", "60"])
    ex.signal(signal.SIGINT)
    assert ex.wait(10) == 130


def test_only_live_processes_carrying_the_mark_are_signalled() -> None:
    mark = new_mark()
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    marked = subprocess.Popen(sleep, env={MARK: mark})
    stranger = subprocess.Popen(sleep, env={MARK: new_mark()})
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is reaped: no process to open, nothing sent
    # Popen returns once the child has exec'd: its environment holds the mark by now.
    try:
        pids = [gone.pid, stranger.pid, marked.pid]
        assert signal_marked(pids, mark, signal.SIGTERM) == 1
        assert marked.wait(10) == -signal.SIGTERM and stranger.poll() is None
    finally:
        for p in (marked, stranger):
            p.kill()
            p.wait()
