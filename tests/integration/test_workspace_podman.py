"""The podman workspace with real containers, real processes and real cgroups: a workspace
from an image built here (busybox and the host's python3, `testbed/oci_image.py`), what
it can reach (nothing of the agent's) and what its limits do to it (fork bombs, memory,
leftovers), while this test process plays the agent.

Nothing here skips: a machine without podman, catatonit, busybox-static or root fails in
the fixtures naming what is missing (.ci/run installs them)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from idlegrid.agent.workspace import open_runtime
from idlegrid.agent.workspace.base import Limits, WorkspaceSpec, killed_by
from idlegrid.agent.workspace.podman import PodmanRuntime, PodmanWorkspace
from idlegrid.errors import ProvisioningFailed, SandboxUnavailable
from idlegrid.testbed import oci_image, sandboxes
from idlegrid.testbed.inprocess import wait_until

pytestmark = pytest.mark.slow  # real containers, a fork bomb, an OOM kill: about 15 s


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stands in for the agent's data dir, with a key file in it."""
    d = tmp_path_factory.mktemp("agent-data")
    (d / "node-key").write_text("SECRET-KEY-MATERIAL\n")
    (d / "node-key").chmod(0o600)
    return d


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> PodmanRuntime:
    rt = open_runtime(
        "podman",
        tmp_path_factory.mktemp("workspaces"),
        image=oci_image.build(),
        oci_runtime=oci_image.oci_runtime(),
    )
    assert isinstance(rt, PodmanRuntime)
    return rt


@pytest.fixture
def ws(runtime: PodmanRuntime, request: pytest.FixtureRequest) -> Iterator[PodmanWorkspace]:
    limits = getattr(request, "param", Limits(cpus=1, memory_bytes=256 << 20, pids=64))
    lease = "oci-" + request.node.name.split("[")[0][-36:].replace("test_", "")
    w = runtime.create(WorkspaceSpec(lease, limits))
    try:
        yield w
    finally:
        w.wipe()


def sh(w: PodmanWorkspace, script: str, timeout: float = 60) -> tuple[int, str, str]:
    code, out, err = w.exec(["/bin/sh", "-c", script]).run(timeout)
    return code, out.decode(), err.decode()


def containers(lease: str) -> list[str]:
    out = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"label=idlegrid.lease={lease}", "--format", "{{.ID}}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.split()


def test_exec_returns_output_exit_code_and_stdin(ws: PodmanWorkspace) -> None:
    code, out, err = ws.exec(["/bin/sh", "-c", "cat; echo two >&2; exit 7"], stdin=b"in\n").run(30)
    assert (code, out, err) == (7, b"in\n", b"two\n")
    code, out, _ = sh(ws, "id -u; hostname; pwd; echo $HOME; python -c 'print(6*7)'")
    assert (code, out.split()) == (0, [str(ws.uid), "workspace", "/work", "/work", "42"])
    assert ws.uid >= 300_000  # the lease's own host uid, not root
    code, out, _ = ws.exec(["sh", "-c", "pwd; echo $X"], env={"X": "y"}, cwd="/tmp").run(30)
    assert (code, out) == (0, b"/tmp\ny\n")
    assert ws.exec(["no-such-program"]).run(30)[0] == 127


def test_the_agents_data_dir_is_invisible_and_the_root_read_only(
    ws: PodmanWorkspace, agent_dir: Path
) -> None:
    code, out, err = sh(ws, f"cat {agent_dir}/node-key; ls /root /home 2>&1; ls /")
    assert "SECRET" not in out + err and "No such file" in err
    code, out, err = sh(ws, "touch /usr/x || exit 9")
    assert code == 9 and "Read-only" in err
    code, out, _ = sh(ws, "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; cat /proc/net/dev")
    caps = [line.split()[1] for line in out.splitlines() if line.startswith("Cap")]
    assert caps == ["0000000000000000"] * 3  # no capabilities at all
    assert [x.split(":")[0].strip() for x in out.splitlines()[5:]] == ["lo"]  # no network out
    # Outside, the workload's files belong to the lease's uid.
    assert sh(ws, "echo hi > /work/mine")[0] == 0
    assert (ws.work / "mine").stat().st_uid == ws.uid


@pytest.mark.parametrize("ws", [Limits(cpus=1, memory_bytes=256 << 20, pids=32)], indirect=True)
def test_a_fork_bomb_hits_the_pids_limit_and_the_agent_keeps_working(ws: PodmanWorkspace) -> None:
    assert ws.cgroup is not None
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    ex = ws.exec(["python", "-c", bomb])
    wait_until(lambda: len(ws.cgroup.pids()) > 16, timeout_s=20)  # type: ignore[union-attr]
    assert len(ws.cgroup.pids()) <= 32
    assert subprocess.run(["true"], check=False).returncode == 0  # the agent still forks
    t0 = time.monotonic()
    ws.kill_all(timeout=5.0)
    assert time.monotonic() - t0 < 5.0
    assert killed_by(ex.wait(10)) is not None or ex.wait(10) != 0
    assert sh(ws, "echo alive")[1] == "alive\n"  # restarted: the workspace takes commands


@pytest.mark.parametrize("ws", [Limits(cpus=1, memory_bytes=64 << 20, pids=64)], indirect=True)
def test_allocating_past_the_memory_limit_kills_the_workload_not_the_agent(
    ws: PodmanWorkspace,
) -> None:
    code, _, _ = ws.exec(["python", "-c", "x = b'1' * (512 << 20); print(len(x))"]).run(60)
    assert code == 137 and killed_by(code) is not None
    assert (ws.usage().oom_kills or 0) >= 1
    assert sh(ws, "echo alive")[1] == "alive\n"  # the workspace, and this agent, go on


def test_end_leaves_no_process_no_container_and_no_disk(runtime: PodmanRuntime) -> None:
    w = runtime.create(WorkspaceSpec("oci-wipe-me"))
    try:
        # A detached process outlives its exec (unlike bwrap): only the end reaches it.
        assert sh(w, "echo x > /work/f; setsid sleep 1000 >/dev/null 2>&1 &")[0] == 0
        assert w.cgroup is not None
        wait_until(lambda: len(w.cgroup.pids()) >= 2, timeout_s=10)  # type: ignore[union-attr]
        pids, pid1 = w.cgroup.pids(), w.pid
        assert containers("oci-wipe-me")
        t0 = time.monotonic()
    finally:
        w.wipe()
    assert time.monotonic() - t0 < 5.0
    assert not any(Path(f"/proc/{p}").exists() for p in [*pids, pid1])
    assert containers("oci-wipe-me") == []
    assert not w.dir.exists() and str(w.work) not in Path("/proc/mounts").read_text()


def test_a_missing_image_fails_provisioning_naming_it(runtime: PodmanRuntime) -> None:
    with pytest.raises(ProvisioningFailed) as e:
        runtime.create(WorkspaceSpec("oci-no-image", image="localhost/no-such-image:1"))
    assert e.value.step == "image" and "localhost/no-such-image:1" in str(e.value)
    assert not (runtime.root / "oci-no-image").exists() and containers("oci-no-image") == []


def test_only_the_leased_gpus_devices_are_in_the_container(runtime: PodmanRuntime) -> None:
    """Issue 18, part 1, as in the bwrap runtime: the leased GPU's node and the control
    node are in the container as the host's devices, CUDA_VISIBLE_DEVICES names it, the
    host's other GPUs are absent (stand-in nodes where the host has no GPU)."""
    with sandboxes.gpu_device_nodes() as (gpus, standins):
        leased, others = gpus[-1], gpus[:-1]
        w = runtime.create(WorkspaceSpec("oci-gpu", gpus=(leased,)))
        try:
            sandboxes.check_gpu_view(lambda line: sh(w, line), leased, others, standins)
        finally:
            w.wipe()


def test_podman_absent_is_a_sandbox_unavailable_naming_it(tmp_path: Path) -> None:
    saved = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path)  # a PATH with nothing on it
    try:
        with pytest.raises(SandboxUnavailable) as e:
            open_runtime("podman", tmp_path / "ws", image=oci_image.TAG)
    finally:
        os.environ["PATH"] = saved
    assert e.value.runtime == "podman" and "podman" in e.value.reason


def test_the_agents_own_connection_reaches_the_containers_loopback(ws: PodmanWorkspace) -> None:
    echo = (
        "import socket\n"
        "s = socket.create_server(('127.0.0.1', 8702))\n"
        "c, _ = s.accept()\n"
        "while d := c.recv(65536):\n"
        "    c.sendall(d.upper())\n"
    )
    server = ws.exec(["python", "-c", echo])
    mine = os.readlink("/proc/thread-self/ns/net")
    try:
        conn = None

        def listening() -> bool:
            nonlocal conn
            conn = ws.connect(8702)
            assert conn is not None  # the agent is root: it enters the container's netns
            return conn.sock is not None

        wait_until(listening, timeout_s=20, interval_s=0.1)
        assert conn is not None and conn.write(b"hello")
        conn.close_stdin()
        got = b"".join(data for stream, data in conn.chunks() if stream == "stdout")
        assert got == b"HELLO" and conn.wait() == 0
        assert server.wait(10) == 0
        assert os.readlink("/proc/thread-self/ns/net") == mine
    finally:
        server.signal()


def test_a_signal_reaches_the_command_in_the_container_not_just_the_client(
    ws: PodmanWorkspace,
) -> None:
    assert ws.cgroup is not None
    trap = "trap 'echo got-int; exit 5' INT; echo ready; while :; do sleep 0.1; done"
    ex = ws.exec(["sh", "-c", trap])
    out = ex.chunks()
    assert next(out) == ("stdout", b"ready\n")
    ex.signal(2)  # SIGINT: the shell's trap runs and says so
    assert [d for s, d in out if s == "stdout"] == [b"got-int\n"] and ex.wait(10) == 5
    # SIGKILL ends the whole command, its background children too, not only `podman exec`.
    ex = ws.exec(["sh", "-c", "sleep 1000 & echo ready; sleep 1000"])
    assert next(ex.chunks()) == ("stdout", b"ready\n")
    ex.signal()
    assert killed_by(ex.wait(10)) is not None
    wait_until(lambda: len(ws.cgroup.pids()) == 1, timeout_s=5)  # type: ignore[union-attr]
    assert ws.cgroup.pids() == [ws.pid]  # only the pause process is left
