"""The bwrap runtime's seccomp filter, from inside a real workspace: what it refuses (nested
user namespaces, the keyring, eBPF, perf, userfaultfd, mounts, io_uring, another ABI) and
what still works under it (Python, pip, fork, threads, a loopback socket, a shell).

Each refusal is checked with arguments the kernel would answer differently without the
filter (ENOENT for a mount on a missing path, ENOSPC for a user namespace that bwrap's
--disable-userns forbids, success for keyctl), so every test here fails with the filter
removed. Nothing skips but the x32 check off x86-64: a machine without bubblewrap, root or
libseccomp fails in the `runtime` fixture with SandboxUnavailable naming what is missing."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyseccomp
import pytest

from idlegrid.agent.workspace.base import Limits, WorkspaceSpec, killed_by
from idlegrid.agent.workspace.bwrap import BwrapRuntime, BwrapWorkspace
from idlegrid.testbed import sandboxes
from idlegrid.testbed.sandboxes import py, sh

pytestmark = pytest.mark.slow  # real sandboxes: about 3 s

# Each call with arguments that succeed, or fail with another errno, without the filter.
PROBE = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
nr = json.loads(sys.argv[1])
calls = {
    "keyctl": (0, -3, 1),  # KEYCTL_GET_KEYRING_ID of the session keyring, created
    "add_key": (b"user", b"k", b"v", 1, -3),
    "bpf": (1000, None, 0),  # no such command: EINVAL
    "perf_event_open": (None, 0, -1, -1, 0),  # EFAULT
    "userfaultfd": (0o2000000 | 1,),  # O_CLOEXEC | UFFD_USER_MODE_ONLY: allowed unprivileged
    "mount": (b"none", b"/no/such/dir", b"tmpfs", 0, None),  # ENOENT
    "setns": (-1, 0),  # EBADF
    "name_to_handle_at": (-100, b"/", None, None, 0),  # EFAULT
    "io_uring_setup": (1, None),  # EFAULT
    "clone3": (None, 0),  # EINVAL
}
out = {}
for name, args in calls.items():
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr[name]), *args)
    out[name] = "ok" if r >= 0 else os.strerror(ctypes.get_errno())
print(json.dumps(out))
"""
EPERM = ("keyctl", "add_key", "bpf", "perf_event_open", "userfaultfd", "mount", "setns")
ENOSYS = ("io_uring_setup", "clone3")


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> BwrapRuntime:
    mktemp = tmp_path_factory.mktemp
    return sandboxes.bwrap_runtime(
        mktemp("workspaces"), mktemp("wheels"), sandboxes.agent_dir(mktemp("agent-data"))
    )


@pytest.fixture(scope="module")
def ws(runtime: BwrapRuntime) -> Iterator[BwrapWorkspace]:
    w = runtime.create(WorkspaceSpec("seccomp", Limits(cpus=1, memory_bytes=256 << 20, pids=64)))
    try:
        yield w
    finally:
        w.wipe()


def _nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


def test_nested_user_namespaces_are_refused_with_eperm(ws: BwrapWorkspace) -> None:
    code, _, err = sh(ws, "unshare -U true")
    assert code != 0 and "Operation not permitted" in err, err
    code, _, err = sh(ws, "unshare -r true")  # the same, mapping root
    assert code != 0 and "Operation not permitted" in err, err
    # clone with CLONE_NEWUSER | SIGCHLD, as a raw syscall (glibc's fork would not set it).
    raw = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"r = libc.syscall(ctypes.c_long({_nr('clone')}), ctypes.c_long(0x10000000 | 17),"
        " None, None, None, None)\n"
        "if r == 0:\n    os._exit(0)\n"
        "print(r, os.strerror(ctypes.get_errno()))\n"
    )
    code, out, err = py(ws, raw)
    assert (code, out) == (0, "-1 Operation not permitted\n"), err


def test_the_kernels_dangerous_interfaces_answer_eperm_or_enosys(ws: BwrapWorkspace) -> None:
    nrs = {name: _nr(name) for name in (*EPERM, "name_to_handle_at", *ENOSYS)}
    code, out, err = py(ws, PROBE, json.dumps(nrs))
    assert code == 0, err
    got = json.loads(out)
    assert {n: got[n] for n in (*EPERM, "name_to_handle_at")} == dict.fromkeys(
        (*EPERM, "name_to_handle_at"), "Operation not permitted"
    )
    assert {n: got[n] for n in ENOSYS} == dict.fromkeys(ENOSYS, "Function not implemented")


def test_mounting_a_filesystem_fails(ws: BwrapWorkspace) -> None:
    code, _, _ = sh(
        ws, "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m; grep ' /tmp/m ' /proc/mounts"
    )
    assert code != 0  # mount(8) fails and nothing is mounted there
    # A missing mount point: the kernel would look it up (ENOENT) before any permission check.
    mount = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.mount(b'none', b'/no/such/dir', b'tmpfs', 0, None)\n"
        "print(r, os.strerror(ctypes.get_errno()))\n"
    )
    assert py(ws, mount)[1] == "-1 Operation not permitted\n"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x32 is an x86-64 ABI")
def test_a_syscall_through_another_abi_kills_the_process(ws: BwrapWorkspace) -> None:
    # getpid (39) with the x32 bit: not the filter's ABI, so the process dies by SIGSYS
    # (without the filter the kernel answers ENOSYS or the pid: no way around the list).
    x32 = "import ctypes; print(ctypes.CDLL(None).syscall(0x40000000 | 39))"
    code, out, _ = py(ws, x32)
    signal = killed_by(code)
    assert signal is not None and signal.name == "SIGSYS", (code, out)


def test_pid_1_carries_the_filter_and_ptrace_stays_allowed(ws: BwrapWorkspace) -> None:
    code, out, _ = sh(ws, "grep '^Seccomp:' /proc/self/status /proc/1/status")
    assert code == 0 and out.split() == [
        "/proc/self/status:Seccomp:", "2", "/proc/1/status:Seccomp:", "2"
    ]  # fmt: skip
    # A child asks to be traced and stops; its parent sees the stop: gdb's and strace's path.
    trace = (
        "import ctypes, os, signal\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    libc.ptrace(0, 0, None, None)\n"  # PTRACE_TRACEME
        "    os.kill(os.getpid(), signal.SIGSTOP)\n"
        "    os._exit(3)\n"
        "_, status = os.waitpid(pid, os.WUNTRACED)\n"
        "print(os.WIFSTOPPED(status))\n"
        "libc.ptrace(7, pid, None, None)\n"  # PTRACE_CONT
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    code, out, err = py(ws, trace)
    assert (code, out.split()) == (0, ["True", "3"]), err


def test_ordinary_work_runs_under_the_filter(ws: BwrapWorkspace) -> None:
    work = (
        "import os, socket, subprocess, threading\n"
        "assert 'Seccomp:\\t2' in open('/proc/self/status').read()\n"
        "srv = socket.create_server(('127.0.0.1', 0))\n"
        "port = srv.getsockname()[1]\n"
        "def serve():\n"
        "    c, _ = srv.accept()\n"
        "    c.sendall(c.recv(16).upper())\n"
        "    c.close()\n"
        "threads = [threading.Thread(target=serve)] + [threading.Thread(target=sum, args=([1],))"
        " for _ in range(8)]\n"
        "[t.start() for t in threads]\n"
        "with socket.create_connection(('127.0.0.1', port)) as c:\n"
        "    c.sendall(b'ping')\n"
        "    print(c.recv(16).decode())\n"
        "[t.join() for t in threads]\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(4)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
        "print(subprocess.run(['sh', '-c', 'echo spawned'], capture_output=True, text=True)"
        ".stdout.strip())\n"
    )
    code, out, err = py(ws, work)
    assert (code, out.split()) == (0, ["PING", "4", "spawned"]), err
    code, out, err = sh(
        ws,
        "python -m pip --version | cut -d' ' -f1; ulimit -n 64; ulimit -n; "
        "echo a b c | tr ' ' '\\n' | sort -r | head -1; "
        "grep '^Seccomp:' /proc/self/status",
    )
    assert (code, out.split()) == (0, ["pip", "64", "c", "Seccomp:", "2"]), err


def test_an_agent_without_libseccomp_refuses_to_open_the_runtime(tmp_path: Path) -> None:
    # A fresh agent process in which pyseccomp cannot be imported (as on a provider without
    # it): the runtime refuses, naming libseccomp, rather than start leases unconfined.
    script = (
        "import sys\n"
        "sys.modules['pyseccomp'] = None\n"
        "from pathlib import Path\n"
        "from idlegrid.agent.workspace import open_runtime\n"
        "from idlegrid.errors import SandboxUnavailable\n"
        "try:\n"
        f"    open_runtime('bwrap', Path({str(tmp_path / 'ws')!r}))\n"
        "except SandboxUnavailable as e:\n"
        "    print(e.reason)\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert "libseccomp" in done.stdout and "pyseccomp" in done.stdout
