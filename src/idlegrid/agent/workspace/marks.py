"""Signals for the processes of one exec, found by a marker in their environment: each exec
gets a random `IDLEGRID_EXEC_ID` (128 bits), which its command and everything the command
starts inherit, and a signal goes to the processes of the lease's own cgroup whose
`/proc/PID/environ` holds it. Shared by the runtimes whose outermost process forwards no
signals: the `podman exec` client, and bwrap (killed by a SIGINT, it ends the sandbox with
SIGKILL through `--die-with-parent`).

Why a marker and not the PID namespace's init: bwrap's init (pid 1 inside, the workload's
parent) forwards nothing, and several execs of one podman container share one namespace.
The search is safe by construction: it reads only the lease's cgroup.procs, so a workload
that rewrites its environment (or drops the marker) only changes which of its own lease's
processes are reached, and the marker of another exec is not visible to it (each bwrap exec
has its own PID namespace). A pidfd is opened before the environment is read and the
signal sent through it: a pid that was reused meanwhile gets nothing (ESRCH).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from idlegrid.agent.workspace.base import Execution, Stdin

MARK = "IDLEGRID_EXEC_ID"
# Signals that end a process that set no handler: sent before the command runs, they end
# the sandbox being built (the outermost process), as they would the command itself.
ENDING = frozenset(signal.valid_signals()) - {
    signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,  # ignored by default
    signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,  # stop, not end
}  # fmt: skip


def new_mark() -> str:
    """A fresh, unguessable marker value for one exec."""
    return uuid.uuid4().hex


def signal_marked(pids: Iterable[int], mark: str, sig: int) -> int:
    """Send `sig` to each of `pids` whose environment holds the marker `mark`; how many."""
    needle = f"{MARK}={mark}".encode()
    sent = 0
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue  # gone meanwhile
        try:
            # Read while the pidfd pins the process: if it was replaced by a reused pid,
            # the send below fails, so the environment read is never a stranger's.
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                signal.pidfd_send_signal(fd, sig)
                sent += 1
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        finally:
            os.close(fd)
    return sent


class MarkedExecution(Execution):
    """A command whose signals go to its own processes (found by `mark` among `pids()`),
    as a terminal signals its foreground group; SIGKILL ends the outermost process too.

    `early`: where no marked process is found and none ever was (the runtime is still
    building the sandbox), an ending signal goes to the outermost process instead, when
    that ends the whole command (bwrap); the `podman exec` client, killed, would not."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        stdin: Stdin,
        pids: Callable[[], Iterable[int]],
        mark: str,
        *,
        early: bool = False,
    ) -> None:
        super().__init__(proc, stdin)
        self.pids = pids
        self.mark = mark
        self.early = early
        self._reached = False  # a signal found the command's processes once

    def signal(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of this command (a number that is no signal is dropped)."""
        if self.proc.returncode is not None or sig not in signal.valid_signals():
            return
        if signal_marked(self.pids(), self.mark, sig):
            self._reached = True
        elif self.early and not self._reached and sig in ENDING:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
