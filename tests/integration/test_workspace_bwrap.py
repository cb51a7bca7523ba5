"""The bubblewrap workspace with real processes, the real sandbox and real cgroups: what a
workload can reach (nothing of the agent's, of another lease's, of loopback) and what its
limits do to it (fork bombs, memory, leftovers), while this test process plays the agent.

Nothing here skips: a machine without bubblewrap, root or the cgroup controllers fails in
the `runtime` fixture with SandboxUnavailable naming what is missing (.ci/run installs
bubblewrap)."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from idlegrid.agent.workspace.base import Limits, WorkspaceSpec, killed_by
from idlegrid.agent.workspace.bwrap import BwrapRuntime, BwrapWorkspace
from idlegrid.agent.workspace.connection import Connection
from idlegrid.testbed import sandboxes
from idlegrid.testbed.inprocess import wait_until
from idlegrid.testbed.sandboxes import sh

pytestmark = pytest.mark.slow  # real sandboxes, a fork bomb, an OOM kill: about 15 s


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stands in for the agent's data dir, with a key file in it."""
    return sandboxes.agent_dir(tmp_path_factory.mktemp("agent-data"))


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> BwrapRuntime:
    mktemp = tmp_path_factory.mktemp
    return sandboxes.bwrap_runtime(mktemp("workspaces"), mktemp("wheels"), agent_dir)


@pytest.fixture
def ws(runtime: BwrapRuntime, request: pytest.FixtureRequest) -> Iterator[BwrapWorkspace]:
    limits = getattr(request, "param", Limits(cpus=1, memory_bytes=256 << 20, pids=64))
    lease = request.node.name.split("[")[0][-40:].replace("test_", "")
    w = runtime.create(WorkspaceSpec(lease, limits))
    try:
        yield w
    finally:
        w.wipe()


def test_exec_streams_output_as_written_and_keeps_the_exit_code(ws: BwrapWorkspace) -> None:
    ex = ws.exec(["/bin/sh", "-c", "echo one; sleep 1; echo two >&2; cat; exit 7"], stdin=b"in\n")
    seen = []
    for stream, data in ex.chunks():
        seen.append((stream, data, time.monotonic()))
    assert ex.wait() == 7
    assert [(s, d) for s, d, _ in seen] == [
        ("stdout", b"one\n"),
        ("stderr", b"two\n"),
        ("stdout", b"in\n"),
    ]
    assert seen[1][2] - seen[0][2] > 0.8  # the first line came before the sleep, not at the end
    code, out, _ = sh(ws, "id -un; hostname; pwd; echo $HOME")
    assert (code, out.split()) == (0, ["work", "workspace", "/work", "/work"])


def test_the_agents_data_dir_key_file_and_home_are_unreadable(
    ws: BwrapWorkspace, agent_dir: Path
) -> None:
    key = agent_dir / "node-key"
    code, out, err = sh(
        ws, f"cat {key}; cat {agent_dir}/*; ls /root /home /var /run /srv 2>&1; ls /"
    )
    assert "SECRET" not in out + err
    assert "No such file" in err
    for absent in ("root", "home", "var", "run", "srv", "boot", "mnt", "media"):
        assert absent not in out.split()  # not even the directory is there
    code, _, err = sh(ws, "touch /usr/x || exit 9")
    assert code == 9 and "Read-only" in err
    # Outside, the workload's files belong to the lease's own unprivileged uid, not root.
    assert sh(ws, "echo hi > /work/mine")[0] == 0
    assert (ws.work / "mine").stat().st_uid == ws.uid != 0


def test_another_lease_work_and_processes_are_invisible(
    runtime: BwrapRuntime, ws: BwrapWorkspace
) -> None:
    other = runtime.create(WorkspaceSpec("other-lease"))
    try:
        assert sh(other, "echo other-secret > /work/s")[0] == 0
        running = other.exec(["sleep", "30"])
        code, out, err = sh(ws, f"ls /work; cat {other.work}/s; cat /proc/*/cmdline | tr '\\0' ' '")
        assert "other-secret" not in out and "s" not in out.split()[:2]
        assert "sleep 30" not in out
        running.signal()
        running.wait()
    finally:
        other.wipe()


def test_only_the_leased_gpus_device_nodes_are_in_the_workspace(
    tmp_path: Path, agent_dir: Path
) -> None:
    """Issue 18, part 1: the leased GPU's node (and the control node) are bound into the
    workspace as working devices, CUDA_VISIBLE_DEVICES names it, the host's other GPUs are
    absent, and a lease without GPUs sees none."""
    with sandboxes.gpu_device_nodes() as (gpus, standins):
        leased, others = gpus[-1], gpus[:-1]
        # A runtime made now: it reads the host's devices when it starts (bwrap.probe_host).
        (tmp_path / "ws").mkdir()
        (tmp_path / "wheels").mkdir()
        runtime = sandboxes.bwrap_runtime(tmp_path / "ws", tmp_path / "wheels", agent_dir)
        with_gpu = runtime.create(WorkspaceSpec("with-gpu", gpus=(leased,)))
        without = runtime.create(WorkspaceSpec("without-gpu"))
        try:
            sandboxes.check_gpu_view(lambda line: sh(with_gpu, line), leased, others, standins)
            code, out, _ = sh(without, sandboxes.SHOW_GPUS)
            assert code == 0 and not [n for n in out.split() if n.startswith("nvidia")], out
            assert "cuda=" in out.split()
        finally:
            with_gpu.wipe()
            without.wipe()


def test_loopback_of_the_provider_is_unreachable(ws: BwrapWorkspace) -> None:
    # Stands in for the coordinator's operator routes, served on the provider's loopback.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.status == 200  # reachable from the provider itself
        probe = (
            "import urllib.request, sys\n"
            "try:\n"
            f"    urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=3)\n"
            "except OSError as e:\n"
            "    print(type(e).__name__, e); sys.exit(5)\n"
        )
        code, out, _ = ws.exec(["python", "-c", probe]).run(30)
        assert code == 5, out
        code, out, _ = sh(ws, "cat /proc/net/dev | tail -n +3 | cut -d: -f1")
        assert out.split() == ["lo"]  # a network namespace of its own, no interface out
    finally:
        server.shutdown()
        server.server_close()


def test_the_agents_own_connection_reaches_the_workspaces_loopback_only(
    ws: BwrapWorkspace,
) -> None:
    # Port-forwarding without a relay process: the agent makes a socket in the lease's
    # network namespace (workspace/connection.py), from a thread that leaves with it.
    echo = (
        "import socket\n"
        "s = socket.create_server(('127.0.0.1', 8701))\n"
        "c, _ = s.accept()\n"
        "while d := c.recv(65536):\n"
        "    c.sendall(d.upper())\n"
    )
    server = ws.exec(["python", "-c", echo])
    host = socket.create_server(("127.0.0.1", 0))  # the provider's own loopback
    mine = os.readlink("/proc/thread-self/ns/net")
    try:
        conn: Connection | None = None

        def listening() -> bool:
            nonlocal conn
            conn = ws.connect(8701)
            assert conn is not None  # this VM has `ip`: the lease has a namespace to enter
            return conn.sock is not None

        wait_until(listening, timeout_s=20, interval_s=0.1)
        assert conn is not None and conn.write(b"hello")
        conn.close_stdin()
        got = b"".join(data for stream, data in conn.chunks() if stream == "stdout")
        assert got == b"HELLO" and conn.wait() == 0
        assert server.wait(10) == 0
        # The agent's threads stay in their own namespace.
        assert os.readlink("/proc/thread-self/ns/net") == mine
        # A port open on the provider's loopback only is not reached through it.
        refused = ws.connect(host.getsockname()[1])
        assert refused is not None and refused.sock is None
        assert [s for s, _ in refused.chunks()] == ["stderr"] and refused.wait() == 2
        saved, ws.netns = ws.netns, ws.dir / "no-such-netns"
        try:  # a namespace the agent cannot enter: the forward falls back to an exec
            assert ws.connect(8701) is None
        finally:
            ws.netns = saved
    finally:
        host.close()
        server.signal()


@pytest.mark.parametrize("ws", [Limits(cpus=1, memory_bytes=256 << 20, pids=32)], indirect=True)
def test_a_fork_bomb_hits_the_pids_limit_and_the_agent_keeps_working(ws: BwrapWorkspace) -> None:
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    ex = ws.exec(["python", "-c", bomb])
    time.sleep(2.0)
    assert 16 < len(ws.cgroup.pids()) <= 32
    assert subprocess.run(["true"], check=False).returncode == 0  # the agent still forks
    t0 = time.monotonic()
    ws.kill_all(timeout=5.0)
    assert time.monotonic() - t0 < 5.0 and ws.cgroup.pids() == []
    assert killed_by(ex.wait(5)) is not None


@pytest.mark.parametrize("ws", [Limits(cpus=1, memory_bytes=64 << 20, pids=64)], indirect=True)
def test_allocating_past_the_memory_limit_kills_the_workload_not_the_agent(
    ws: BwrapWorkspace,
) -> None:
    code, _, _ = ws.exec(["python", "-c", "x = b'1' * (512 << 20); print(len(x))"]).run(60)
    assert code == 137 and killed_by(code) is not None and killed_by(code).name == "SIGKILL"
    assert (ws.usage().oom_kills or 0) >= 1
    assert sh(ws, "echo alive")[1] == "alive\n"  # the workspace, and this agent, go on


def test_processes_left_running_are_gone_within_five_seconds_of_kill_all(
    ws: BwrapWorkspace,
) -> None:
    ex = ws.exec(["/bin/sh", "-c", "setsid nohup sleep 1000 >/dev/null 2>&1 & echo up; sleep 1000"])
    first = next(ex.chunks())
    assert first == ("stdout", b"up\n")
    assert len(ws.cgroup.pids()) >= 2
    t0 = time.monotonic()
    ws.kill_all()
    assert ws.cgroup.pids() == [] and time.monotonic() - t0 < 5.0
    ex.wait(5)
    # A detached process outlives no exec: its PID namespace ends with the command.
    assert sh(ws, "setsid nohup sleep 1000 >/dev/null 2>&1 &")[0] == 0
    deadline = time.monotonic() + 5
    while ws.cgroup.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ws.cgroup.pids() == []


def test_the_venv_sees_the_providers_numpy_and_installs_pip_requirements(
    runtime: BwrapRuntime,
) -> None:
    w = runtime.create(WorkspaceSpec("venv-pip", pip=("igtiny",)))
    try:
        code, out, err = w.exec(
            [
                "python",
                "-c",
                "import sys, numpy as n, igtiny as t; "
                "print(sys.prefix, n.__file__, t.__file__, t.ANSWER)",
            ]
        ).run(60)
        assert code == 0, err
        prefix, np_file, tiny_file, answer = out.decode().split()
        assert prefix == "/work/.venv" and np_file.startswith("/opt/idlegrid/site-packages/numpy")
        assert tiny_file.startswith("/work/.venv/lib/") and answer == "42"
        code, _, err = w.exec(["python", "-c", "import numpy, os; os.remove(numpy.__file__)"]).run(
            30
        )
        assert code != 0 and b"Read-only" in err  # the provider's packages are read-only
    finally:
        w.wipe()


@pytest.mark.parametrize(
    "ws", [Limits(cpus=0.5, memory_bytes=256 << 20, pids=64, disk_bytes=64 << 20)], indirect=True
)
def test_disk_quota_and_cpu_quota_hold(ws: BwrapWorkspace) -> None:
    code, out, _ = sh(ws, "dd if=/dev/zero of=/work/big bs=1M count=100 2>&1 || exit 28")
    assert code == 28 and "No space left" in out
    assert ws.usage().disk_bytes < 64 << 20
    before = ws.usage().cpu_s or 0.0
    t0 = time.monotonic()
    sh(ws, "timeout 2 sh -c 'while :; do :; done' & timeout 2 sh -c 'while :; do :; done'; wait")
    wall = time.monotonic() - t0
    used = (ws.usage().cpu_s or 0.0) - before
    assert used < 0.5 * wall + 0.3  # two busy loops held to half a core


def test_wipe_leaves_nothing(runtime: BwrapRuntime) -> None:
    w = runtime.create(WorkspaceSpec("wipe-me"))
    assert sh(w, "echo x > /work/f; sleep 1000 &")[0] == 0
    w.wipe()
    assert not w.dir.exists() and not any(d.exists() for d in w.cgroup.dirs.values())
    assert str(w.work) not in Path("/proc/mounts").read_text()
