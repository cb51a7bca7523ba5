"""The `local` runtime: a plain subprocess in a private directory. It ISOLATES NOTHING: the
workload runs as the agent, sees the agent's files and network, and has no limits. It is
for development and tests on machines without bubblewrap, so it must be chosen by name
and with `isolates_nothing=True`; a provider never gets it by default."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from idlegrid.agent.workspace.base import Execution, Stdin, Usage, WorkspaceSpec, disk_used
from idlegrid.agent.workspace.connection import Connection
from idlegrid.agent.workspace.pyenv import provider_python, venv_script
from idlegrid.agent.workspace.sandbox import CUDA_ORDER
from idlegrid.errors import ProvisioningFailed, SandboxUnavailable


class LocalRuntime:
    """Workspaces as directories under `root`; refuses to exist unless told it isolates
    nothing."""

    name = "local"

    def __init__(
        self, root: Path, *, isolates_nothing: bool = False, wheels: Path | None = None
    ) -> None:
        if not isolates_nothing:
            raise SandboxUnavailable(
                self.name,
                "it isolates nothing (no sandbox, no limits): pass isolates_nothing=True, "
                "for development only",
            )
        self.root = root
        self.wheels = wheels
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)

    def create(self, spec: WorkspaceSpec) -> LocalWorkspace:
        """A private directory with a venv in it."""
        ws = LocalWorkspace(self, spec)
        try:
            ws.provision()
        except BaseException:
            ws.wipe()
            raise
        return ws


class LocalWorkspace:
    """One lease's directory; commands run in their own process groups."""

    def __init__(self, runtime: LocalRuntime, spec: WorkspaceSpec) -> None:
        self.runtime = runtime
        self.spec = spec
        self.work = runtime.root / spec.lease / "work"
        self._groups: list[subprocess.Popen[bytes]] = []

    def provision(self) -> None:
        """Make the directory and the venv; install the pip requirements."""
        self.work.mkdir(parents=True, mode=0o700)
        _prefix, version, site = provider_python()
        script = venv_script(
            sys.executable,
            version,
            str(site) if site else None,
            str(self.work / ".venv"),
            self.spec.pip,
            str(self.runtime.wheels) if self.runtime.wheels else None,
        )
        code, out, err = self.exec(["/bin/sh", "-c", script]).run()
        if code != 0:
            detail = (err or out).decode(errors="replace")[-2000:]
            raise ProvisioningFailed(self.spec.lease, "venv", detail, exit_code=code)

    def exec(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str = "/work",
        stdin: Stdin = None,
    ) -> Execution:
        """Run `argv` with `/work` (in `cwd` and in arguments' meaning) the private directory."""
        rel = Path(cwd).relative_to("/work") if cwd.startswith("/work") else Path(cwd)
        venv = self.work / ".venv"
        base = {
            "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.work),
            "LANG": "C.UTF-8",
            "VIRTUAL_ENV": str(venv),
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.spec.gpus)),
            **CUDA_ORDER,
        }
        proc = subprocess.Popen(
            list(argv),
            cwd=self.work / rel,
            env={**base, **(env or {})},
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so kill_all reaches its children
        )
        self._groups.append(proc)
        return Execution(proc, stdin)

    def connect(self, port: int) -> Connection | None:
        """None: a forward runs the relay script as an exec here (the local runtime has no
        network of its own to enter)."""
        return None

    def kill_all(self, timeout: float = 5.0) -> None:
        """Kill each command's process group (a child that left its group escapes: this
        runtime isolates nothing)."""
        for proc in self._groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        for proc in self._groups:
            proc.wait(max(0.0, deadline - time.monotonic()))
        self._groups.clear()

    def usage(self) -> Usage:
        """Only the disk: no cgroup counts for this runtime."""
        return Usage(None, None, None, None, None, disk_used(self.work))

    def wipe(self) -> None:
        """Kill everything, delete the directory."""
        self.kill_all()
        shutil.rmtree(self.work.parent, ignore_errors=True)
