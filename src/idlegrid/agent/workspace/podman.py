"""The `podman` runtime: each lease a rootful OCI container from an image the provider
already has (by reference: `podman image exists`, never a pull), with the same `/work` as
`bwrap` (an ext4 image of the leased size, `disk.py`) bound in.

The container runs only a pause process as PID 1 (the host's static `catatonit -P`, bound
in read-only, so any image works, even one without a shell); each `exec` is a `podman
exec` into it, so every process of the lease shares one PID and network namespace and one
cgroup, and `podman rm -f` ends them all. Isolation: no network (`--network none`: only
`lo`, entered by the agent for port-forward), no capabilities, no-new-privileges, a
read-only root filesystem (tmpfs `/tmp`, charged to the lease's memory), the lease's own
host uid (as `bwrap`), CPU, memory (no swap) and pids limits through podman's cgroup, and
nothing of the host but `/work` and the leased GPUs' device nodes.

The workload's rlimits are set from the agent's own (open files) and the pids limit
(processes): podman's defaults exceed what an agent without CAP_SYS_RESOURCE may set.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import idlegrid.agent.workspace.disk as disk
from idlegrid.agent.workspace.base import Execution, Stdin, Usage, WorkspaceSpec
from idlegrid.agent.workspace.cgroups import LeaseCgroup, host_layout
from idlegrid.agent.workspace.connection import Connection, NamespaceUnavailable
from idlegrid.agent.workspace.marks import MARK, MarkedExecution, new_mark
from idlegrid.agent.workspace.sandbox import CUDA_ORDER, GPU_SHARED
from idlegrid.agent.workspace.uids import LeaseUids
from idlegrid.errors import ProvisioningFailed, SandboxUnavailable

TOOLS = ("podman", "catatonit", "mount", "umount", "mkfs.ext4")
FIRST_UID = 300_000  # apart from bwrap's, so both runtimes on one host never share a uid
INIT = "/.idlegrid-init"  # where catatonit is bound in the container
PREFIX = "idlegrid-ws-"  # container names: idlegrid-ws-<lease>


def _podman(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *argv], capture_output=True, text=True, check=False, timeout=timeout
    )


class PodmanRuntime:
    """Makes podman workspaces under `root` (one directory per lease: its disk image), from
    `image` unless the lease names one; `oci_runtime` picks podman's OCI runtime (e.g.
    `runc` where `crun` refuses the host's cgroups)."""

    name = "podman"

    def __init__(
        self,
        root: Path,
        *,
        image: str | None = None,
        oci_runtime: str | None = None,
        first_uid: int = FIRST_UID,
    ) -> None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise SandboxUnavailable(
                self.name,
                f"missing {', '.join(missing)} (apt-get install podman catatonit e2fsprogs)",
            )
        if os.geteuid() != 0:
            raise SandboxUnavailable(
                self.name, "the agent must run as root: it mounts each lease's disk"
            )
        self.root = root
        self.image = image
        self.oci_runtime = oci_runtime
        self.init = shutil.which("catatonit") or ""
        self.uids = LeaseUids(first_uid)
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)

    def podman(self, *argv: str) -> list[str]:
        """`podman` with this runtime's global options, then `argv`."""
        return ["podman", *(["--runtime", self.oci_runtime] if self.oci_runtime else []), *argv]

    def _uid(self, lease: str) -> int:
        return self.uids.take(lease)

    def release(self, lease: str) -> None:
        """Forget a wiped lease's uid."""
        self.uids.release(lease)

    def sweep(self) -> list[str]:
        """Remove the containers an earlier agent left for workspaces under the root, with
        their disks; the lease ids swept. A directory with no container is not podman's
        (the bwrap runtime's sweep takes it). Run before any lease of this runtime starts."""
        swept: list[str] = []
        for d, _spec in self.uids.leftovers(self.root):
            name = PREFIX + d.name
            if _podman(["container", "exists", name]).returncode != 0:
                continue
            _podman(["rm", "--force", "--time", "0", name])
            disk.unmount(d.name, d / "work")
            shutil.rmtree(d, ignore_errors=True)
            swept.append(d.name)
        return swept

    def create(self, spec: WorkspaceSpec) -> PodmanWorkspace:
        """Check the image, make the disk, start the container; a failure wipes what was made."""
        image = spec.image or self.image
        if spec.egress:
            raise SandboxUnavailable(self.name, "outbound network for workspaces is not built yet")
        if image is None:
            raise ProvisioningFailed(
                spec.lease, "image", "the lease names no image and the provider set no default"
            )
        if spec.pip:
            raise ProvisioningFailed(
                spec.lease, "pip", "the podman runtime installs no pip requirements: use an "
                "image that has them",
            )  # fmt: skip
        if _podman(["image", "exists", image]).returncode != 0:
            raise ProvisioningFailed(
                spec.lease, "image", f"image {image} is not on this provider (it pulls none)"
            )
        if (self.root / spec.lease).exists():
            raise ProvisioningFailed(spec.lease, "disk", "a workspace of that lease exists")
        ws = PodmanWorkspace(self, spec, image, self._uid(spec.lease))
        try:
            ws.provision()
        except BaseException:
            ws.wipe()
            raise
        return ws


class PodmanWorkspace:
    """One lease's container; made by `PodmanRuntime.create`."""

    def __init__(self, runtime: PodmanRuntime, spec: WorkspaceSpec, image: str, uid: int) -> None:
        self.runtime = runtime
        self.spec = spec
        self.image = image
        self.uid = uid
        self.name = PREFIX + spec.lease
        self.dir = runtime.root / spec.lease
        self.work = self.dir / "work"
        self.pid: int | None = None  # the container's PID 1 on the host
        self.cgroup: LeaseCgroup | None = None

    def run_argv(self) -> list[str]:
        """The `podman run` that starts the lease's container (for logs and tests)."""
        lim = self.spec.limits
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        devices = [f"/dev/nvidia{g}" for g in self.spec.gpus if Path(f"/dev/nvidia{g}").exists()]
        if devices:
            devices += [d for d in GPU_SHARED if Path(d).exists()]
        env = {
            "HOME": "/work", "USER": "work", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1",
            # Empty when none is leased: CUDA then sees no device.
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in self.spec.gpus), **CUDA_ORDER,
        }  # fmt: skip
        return self.runtime.podman(
            "run", "--detach", "--name", self.name,
            "--label", f"idlegrid.lease={self.spec.lease}",
            "--network", "none", "--hostname", "workspace",
            "--cap-drop", "all", "--security-opt", "no-new-privileges",
            "--read-only", "--tmpfs", f"/tmp:rw,nosuid,nodev,size={lim.memory_bytes},mode=1777",
            "--user", f"{self.uid}:{self.uid}",
            "--cpus", f"{lim.cpus:g}",
            "--memory", str(lim.memory_bytes), "--memory-swap", str(lim.memory_bytes),
            "--pids-limit", str(lim.pids),
            "--ulimit", f"nofile={nofile[0]}:{nofile[1]}",
            "--ulimit", f"nproc={lim.pids}:{lim.pids}",
            "--log-driver", "none",
            "--mount", f"type=bind,source={self.work},destination=/work,rw,nosuid,nodev",
            "--mount", f"type=bind,source={self.runtime.init},destination={INIT},ro",
            *[a for d in devices for a in ("--device", d)],
            *[a for k, v in env.items() for a in ("--env", f"{k}={v}")],
            "--workdir", "/work",
            "--entrypoint", json.dumps([INIT, "-P"]),
            self.image,
        )  # fmt: skip

    def provision(self) -> None:
        """Make the disk, start the container, find its PID 1 and cgroup."""
        lease = self.spec.lease
        self.dir.mkdir(mode=0o700)
        disk.make(lease, self.dir / "disk.img", self.work, self.spec.limits.disk_bytes, self.uid)
        disk.run(lease, "container", self.run_argv())
        r = _podman(["inspect", "--format", "{{.State.Pid}} {{.State.CgroupPath}}", self.name])
        pid, _, cgroup = r.stdout.strip().partition(" ")
        if r.returncode != 0 or not pid.isdigit() or int(pid) <= 0:
            raise ProvisioningFailed(lease, "container", f"not running: {r.stderr.strip()}")
        self.pid = int(pid)
        if cgroup.startswith("/"):
            # Podman's own cgroup for the container: read for usage, never written here.
            parent, _, leaf = cgroup.rpartition("/")
            try:
                self.cgroup = LeaseCgroup(host_layout(parent or "/"), leaf)
            except SandboxUnavailable:
                self.cgroup = None

    def exec(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str = "/work",
        stdin: Stdin = None,
    ) -> Execution:
        """`podman exec` `argv` in the lease's container (its limits, uid and namespaces)."""
        if not argv:
            raise ValueError("an empty command")
        mark = new_mark()
        args = ["exec", *(["--interactive"] if stdin is not None else []), "--workdir", cwd]
        for k, v in (env or {}).items():
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise ValueError(f"an environment variable cannot be named {k!r} or hold NUL")
            args += ["--env", f"{k}={v}"]
        args += ["--env", f"{MARK}={mark}"]  # last, so the consumer's env cannot replace it
        proc = subprocess.Popen(
            self.runtime.podman(*args, self.name, *argv),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
        return MarkedExecution(proc, stdin, self.pids, mark)

    def pids(self) -> list[int]:
        """The container's processes on the host (its cgroup's; none where unknown)."""
        return self.cgroup.pids() if self.cgroup is not None else []

    def connect(self, port: int) -> Connection | None:
        """A TCP connection to 127.0.0.1:`port` in the container's network namespace (its
        PID 1's), made by the agent; None where the agent cannot enter it."""
        if self.pid is None:
            return None
        try:
            return Connection.open(port, Path(f"/proc/{self.pid}/ns/net"))
        except NamespaceUnavailable:
            return None

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process (PID 1 first: the kernel then kills the rest of its PID
        namespace), wait until the container stopped, then start its pause process again
        so the workspace takes new commands; TimeoutError if it does not stop in time."""
        _podman(["kill", "--signal", "KILL", self.name], timeout)
        deadline = time.monotonic() + timeout
        while (
            _podman(["inspect", "--format", "{{.State.Running}}", self.name]).stdout.strip()
            == "true"
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"lease {self.spec.lease}: container {self.name} outlived the kill"
                )
            time.sleep(0.02)
        disk.run(self.spec.lease, "restart", self.runtime.podman("start", self.name))
        self.provision_pid()

    def provision_pid(self) -> None:
        """Read the container's PID 1 again (after a restart)."""
        r = _podman(["inspect", "--format", "{{.State.Pid}}", self.name])
        self.pid = int(r.stdout.strip()) if r.stdout.strip().isdigit() else None

    def usage(self) -> Usage:
        """The container's cgroup counters and the filesystem's used bytes."""
        cpu = mem = peak = pids = ooms = None
        if self.cgroup is not None:
            cpu, mem, peak, pids, ooms = self.cgroup.usage()
        return Usage(cpu, mem, peak, pids, ooms, disk.used(self.work))

    def wipe(self) -> None:
        """Remove the container (every process killed), unmount and delete the disk."""
        r = _podman(["rm", "--force", "--time", "0", self.name])
        if r.returncode != 0 and "no such container" not in r.stderr.lower():
            raise ProvisioningFailed(self.spec.lease, "wipe", r.stderr.strip()[-2000:])
        self.pid = None
        disk.unmount(self.spec.lease, self.work)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.runtime.release(self.spec.lease)
