"""The local (unisolated, dev-only) runtime runs commands in its private directory, with a
venv over the provider's packages, and kill_all ends their process groups."""

from __future__ import annotations

import time
from pathlib import Path

from idlegrid.agent.workspace import open_runtime
from idlegrid.agent.workspace.base import WorkspaceSpec


def test_local_workspace_runs_streams_and_kills(tmp_path: Path) -> None:
    rt = open_runtime("local", tmp_path / "ws", isolates_nothing=True)
    ws = rt.create(WorkspaceSpec("dev-1"))
    try:
        code, out, err = ws.exec(
            ["python", "-c", "import sys, numpy; print(sys.prefix); sys.exit(3)"]
        ).run(60)
        assert code == 3 and out.decode().strip().endswith("dev-1/work/.venv"), err
        ex = ws.exec(["/bin/sh", "-c", "sleep 1000 & echo up; wait"])
        assert next(ex.chunks()) == ("stdout", b"up\n")
        t0 = time.monotonic()
        ws.kill_all()
        assert ex.wait(5) == 137 and time.monotonic() - t0 < 5
        assert ws.usage().disk_bytes > 0
    finally:
        ws.wipe()
    assert not (tmp_path / "ws" / "dev-1").exists()
