"""An agent that died with leases running left their workspaces behind (processes in their
cgroups, mounted disks, network namespaces, containers): the next run of that agent wipes
them before it takes any lease (`LeaseHost.sweep`). Real bubblewrap and podman here."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from idlegrid.agent.context import AgentConfig
from idlegrid.agent.leases import LeaseHost
from idlegrid.agent.workspace import open_runtime
from idlegrid.agent.workspace.base import Limits, WorkspaceSpec
from idlegrid.core.lease.controls import LeaseControls
from idlegrid.core.ledger import MICRO, Price
from idlegrid.testbed import oci_image

LIMITS = Limits(cpus=1, memory_bytes=256 << 20, pids=64, disk_bytes=64 << 20)


def _config(root: Path | None, **kw: object) -> AgentConfig:
    return AgentConfig(
        name="sweeper",
        hardware={},
        prefill_tps=1.0,
        decode_tps=1.0,
        price=Price(MICRO, MICRO),
        workspace_root=root,
        **kw,  # type: ignore[arg-type]
    )


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: its parent, gone with the old run, never reaps it)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _mounted(path: Path) -> bool:
    return str(path) in Path("/proc/mounts").read_text()


def test_a_restarted_agent_wipes_the_sandboxes_its_last_run_left(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    # The last run: a workspace with a process left in the background, then the agent died
    # (nothing wiped: the runtime object is simply dropped).
    old = open_runtime("bwrap", root)
    ws = old.create(WorkspaceSpec("left-1", LIMITS))
    running = ws.exec(["/bin/sh", "-c", "echo up; sleep 1000"])  # never waited for
    assert next(running.chunks()) == ("stdout", b"up\n")
    pids = ws.cgroup.pids()  # type: ignore[attr-defined]
    assert pids and _mounted(ws.work)  # type: ignore[attr-defined]
    (root / "not a lease").mkdir()  # a directory no lease id names is left alone
    del old

    host = LeaseHost(_config(root), "n" * 32)
    assert host.sweep() == ["left-1"]
    assert not (root / "left-1").exists() and not _mounted(root / "left-1" / "work")
    assert running.proc.wait(5) is not None  # its sandbox was killed with the cgroup
    for pipe in (running.proc.stdin, running.proc.stdout, running.proc.stderr):
        if pipe is not None:
            pipe.close()
    assert not any(_alive(p) for p in pids)
    assert not any(d.exists() for d in ws.cgroup.dirs.values())  # type: ignore[attr-defined]
    assert (root / "not a lease").is_dir()
    assert host.sweep() == []  # nothing left the second time

    # A fresh lease of the same id starts cleanly afterwards.
    again = host._runtime(None).create(WorkspaceSpec("left-1", LIMITS))
    try:
        assert again.exec(["true"]).run(30)[0] == 0
    finally:
        again.wipe()


def test_a_restarted_agent_removes_the_containers_its_last_run_left(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    image, oci = oci_image.build(), oci_image.oci_runtime()
    old = open_runtime("podman", root, image=image, oci_runtime=oci)
    ws = old.create(WorkspaceSpec("left-2", LIMITS))
    assert ws.exec(["/bin/sh", "-c", "sleep 1000 &"]).run(30)[0] == 0
    name = ws.name  # type: ignore[attr-defined]
    del old

    host = LeaseHost(
        _config(
            root,
            workspace_runtime="podman",
            workspace_options={"image": image, "oci_runtime": oci},
            lease_controls=LeaseControls(runtimes=("podman",)),
        ),
        "m" * 32,
    )
    t0 = time.monotonic()
    assert host.sweep() == ["left-2"]
    assert time.monotonic() - t0 < 30
    ps = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True
    )
    assert name not in ps.stdout.split()
    assert not (root / "left-2").exists() and not _mounted(root / "left-2" / "work")


def test_agents_sharing_a_data_dir_get_workspace_roots_of_their_own(tmp_path: Path) -> None:
    a = LeaseHost(_config(None), "a" * 32)
    b = LeaseHost(_config(None), "b" * 32)
    assert a.root != b.root and a.root.parent == b.root.parent
