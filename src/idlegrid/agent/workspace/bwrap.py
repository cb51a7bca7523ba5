"""The `bwrap` runtime: each lease a bubblewrap sandbox (user, mount, PID, IPC, UTS, cgroup
and network namespaces; a read-only system; its own uid), its processes in its own cgroup,
its `/work` an ext4 image of exactly the leased size, loop-mounted on the provider
(`disk.py`). This needs root, as do cgroups and giving each lease a uid of its own: the
runtime refuses to start otherwise, with the reason.

Each `exec` is a fresh sandbox over the same `/work` and cgroup: a process it leaves in the
background ends with it (its PID namespace ends), and `kill_all` reaches every process of
every exec through the cgroup. A signal for an exec goes to that exec's processes in the
cgroup (found by a marker in their environment: marks.py), not to bwrap, which would end
the sandbox instead of passing it on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import idlegrid.agent.workspace.disk as disk
import idlegrid.agent.workspace.egress as egress
import idlegrid.agent.workspace.sandbox as sandbox
import idlegrid.agent.workspace.seccomp as seccomp
from idlegrid.agent.workspace.base import Execution, Stdin, Usage, WorkspaceSpec
from idlegrid.agent.workspace.cgroups import Layout, LeaseCgroup, host_layout
from idlegrid.agent.workspace.connection import Connection, NamespaceUnavailable
from idlegrid.agent.workspace.marks import MARK, MarkedExecution, new_mark
from idlegrid.agent.workspace.pyenv import provider_python, venv_script
from idlegrid.agent.workspace.uids import LeaseUids
from idlegrid.errors import ProvisioningFailed, SandboxUnavailable

TOOLS = ("bwrap", "setpriv", "unshare", "mount", "umount", "mkfs.ext4")
FIRST_UID = 200_000  # leases get uids from here up: no account of the host has them
STAGE = Path("/run/idlegrid/stage")


def probe_host(stage: Path = STAGE) -> sandbox.Host:
    """What this machine offers the sandbox (see `sandbox.Host`)."""
    system: dict[str, str] = {}
    for path in (*sandbox.SYSTEM, *sandbox.ETC):
        p = Path(path)
        if p.is_symlink():
            system[path] = os.readlink(p)
        elif p.exists():
            system[path] = ""
    dev = Path("/dev")
    devices = frozenset(str(d) for d in dev.glob("nvidia*"))
    prefix, version, site = provider_python()
    return sandbox.Host(system, devices, prefix, version, site, stage)


class BwrapRuntime:
    """Makes bubblewrap workspaces under `root` (one directory per lease, root only)."""

    name = "bwrap"

    def __init__(
        self,
        root: Path,
        *,
        wheels: Path | None = None,
        secrets: Sequence[Path] = (),
        cgroup_parent: str = "",
        stage: Path = STAGE,
        first_uid: int = FIRST_UID,
        seccomp_filter: bool = True,
    ) -> None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise SandboxUnavailable(
                self.name,
                f"missing {', '.join(missing)} (apt-get install bubblewrap util-linux e2fsprogs)",
            )
        if os.geteuid() != 0:
            raise SandboxUnavailable(
                self.name,
                "the agent must run as root: it mounts each lease's disk, writes its cgroup "
                "and gives it a uid of its own",
            )
        self.layout: Layout = host_layout(cgroup_parent)
        # Compiled here, so a provider without libseccomp refuses to start rather than run
        # leases unconfined; off only when asked (benchmarks: bench/bench_lease.py).
        self.seccomp: bytes | None = seccomp.bpf() if seccomp_filter else None
        self.root = root
        self.wheels = wheels
        self.host = probe_host(stage)
        self._check_secrets(secrets)
        if wheels is not None and wheels.stat().st_mode & 0o005 != 0o005:
            raise SandboxUnavailable(
                self.name,
                f"the wheelhouse {wheels} must be readable by others (chmod o+rx): "
                "each lease reads it as its own uid",
            )
        self.uids = LeaseUids(first_uid)
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        self._make_stage(stage)

    def _check_secrets(self, secrets: Sequence[Path]) -> None:
        # A data dir or key file under a path the sandbox sees would be readable from it.
        shown = [Path(p) for p in self.host.system if not self.host.system[p]]
        shown += [b.source for b in sandbox.binds(self.host, self.root, self.wheels)]
        for secret in secrets:
            s = secret.resolve()
            for p in shown:
                if s == p.resolve() or p.resolve() in s.parents:
                    raise SandboxUnavailable(
                        self.name, f"{secret} lies under {p}, which workspaces see"
                    )

    def _make_stage(self, stage: Path) -> None:
        # Empty mount points, walkable by the leases' uids: bound onto in each exec's private
        # mount namespace only, so the host never sees anything mounted here.
        stage.mkdir(parents=True, exist_ok=True)
        for p in (stage, *stage.parents):
            if p == Path("/"):
                break
            if p.stat().st_mode & 0o005 != 0o005:
                p.chmod(p.stat().st_mode | 0o005)
        for name in ("work", "python", "site", "wheels"):
            (stage / name).mkdir(exist_ok=True)
        (stage / "passwd").write_text(sandbox.PASSWD)
        (stage / "group").write_text(sandbox.GROUP)
        (stage / "resolv.conf").write_text(egress.RESOLV_CONF)  # slirp's DNS, for egress

    @staticmethod
    def _no_netns() -> str | None:
        if shutil.which("ip") is None or shutil.which("nsenter") is None:
            return "a lease's own network namespace needs ip and nsenter"
        return None

    def _uid(self, lease: str) -> int:
        return self.uids.take(lease)

    def release(self, lease: str) -> None:
        """Forget a wiped lease's uid."""
        self.uids.release(lease)

    def sweep(self) -> list[str]:
        """Wipe the workspaces an earlier agent left under the root (it died before ending
        them: processes, mounts, cgroups); the lease ids swept. Run before any lease of this
        runtime starts: a directory it did not make itself is taken as a leftover."""
        swept: list[str] = []
        for d, spec in self.uids.leftovers(self.root):
            ws = BwrapWorkspace(self, spec, uid=0)
            if os.path.ismount(d / "net"):
                ws.netns = d / "net"
            ws.wipe()
            swept.append(d.name)
        return swept

    def create(self, spec: WorkspaceSpec) -> BwrapWorkspace:
        """Disk, cgroup, venv and pip requirements; a failure wipes what was made."""
        if spec.egress and (why := egress.available() or self._no_netns()):
            raise SandboxUnavailable(self.name, f"outbound network: {why}")
        if (self.root / spec.lease).exists():
            raise ProvisioningFailed(spec.lease, "disk", "a workspace of that lease exists")
        ws = BwrapWorkspace(self, spec, self._uid(spec.lease))
        try:
            ws.provision()
        except BaseException:
            ws.wipe()
            raise
        return ws


class BwrapWorkspace:
    """One lease's sandbox; made by `BwrapRuntime.create`."""

    def __init__(self, runtime: BwrapRuntime, spec: WorkspaceSpec, uid: int) -> None:
        self.runtime = runtime
        self.spec = spec
        self.uid = uid
        self.dir = runtime.root / spec.lease
        self.image = self.dir / "disk.img"
        self.work = self.dir / "work"
        self.cgroup = LeaseCgroup(runtime.layout, spec.lease)
        # One network namespace for all of the lease's execs (only `lo`), kept by a bind
        # mount of its nsfs file; None where `ip` is missing (each exec then has its own).
        self.netns: Path | None = None
        self.egress: egress.Egress | None = None  # the NAT, where the lease has egress

    def provision(self) -> None:
        """Make the disk and the cgroup, then the venv and the pip requirements."""
        lease = self.spec.lease
        self.dir.mkdir(mode=0o700)
        disk.make(lease, self.image, self.work, self.spec.limits.disk_bytes, self.uid)
        self.cgroup.create(self.spec.limits)
        if shutil.which("ip") is not None and shutil.which("nsenter") is not None:
            net = self.dir / "net"
            net.touch(mode=0o600)
            disk.run(lease, "network", ["unshare", f"--net={net}", "true"])
            self.netns = net
            disk.run(lease, "network", ["nsenter", f"--net={net}", "ip", "link", "set", "lo", "up"])
            if self.spec.egress:
                self.egress = egress.Egress.start(net, lease, self.dir / "egress.log")
        script = venv_script(
            sandbox.python_exe(self.runtime.host),
            self.runtime.host.python_version,
            sandbox.SITE_DIR if self.runtime.host.python_site else None,
            sandbox.VENV,
            self.spec.pip,
            sandbox.WHEELS_DIR if self.runtime.wheels else None,
            index=self.spec.egress,
        )
        code, out, err = self.exec(["/bin/sh", "-c", script]).run()
        if code != 0:
            raise ProvisioningFailed(
                lease, "venv", (err or out).decode(errors="replace")[-2000:], exit_code=code
            )

    def argv(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str = "/work",
        seccomp_fd: int | None = None,
    ) -> list[str]:
        """The full command line `exec` runs (for logs and tests)."""
        return sandbox.command(
            self.runtime.host, self.spec, uid=self.uid, procs=self.cgroup.procs_files,
            work=self.work, wheels=self.runtime.wheels, argv=argv, env=env or {}, cwd=cwd,
            netns=self.netns, seccomp_fd=seccomp_fd,
        )  # fmt: skip

    def exec(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str = "/work",
        stdin: Stdin = None,
    ) -> Execution:
        """Start `argv` in a fresh sandbox over this lease's /work, inside its cgroup; its
        signals go to the command's own processes (marks.py)."""
        mark = new_mark()
        # Last, so the consumer's env cannot replace it (that would only hide its own).
        env = {**(env or {}), MARK: mark}
        fds: tuple[int, ...] = ()
        if (code := self.runtime.seccomp) is not None:
            # bwrap reads the filter to EOF from an inherited fd: a pipe per exec (the filter
            # fits one page, the least a pipe holds, so the write never blocks).
            read, write = os.pipe()
            fds = (read,)
            try:
                os.write(write, code)
            except BaseException:
                os.close(read)
                raise
            finally:
                os.close(write)
        try:
            proc = subprocess.Popen(
                self.argv(argv, env, cwd, seccomp_fd=fds[0] if fds else None),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                pass_fds=fds,
            )
        finally:
            for fd in fds:
                os.close(fd)
        return MarkedExecution(proc, stdin, self.cgroup.pids, mark, early=True)

    def connect(self, port: int) -> Connection | None:
        """A TCP connection to 127.0.0.1:`port` inside the lease's network namespace, made
        by the agent itself (workspace/connection.py); None where each exec has a namespace
        of its own (no `ip`) or the agent cannot enter it: then an exec inside does."""
        if self.netns is None:
            return None
        try:
            return Connection.open(port, self.netns)
        except NamespaceUnavailable:
            return None

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the lease's cgroup; TimeoutError if any survives."""
        self.cgroup.kill(timeout)

    def usage(self) -> Usage:
        """Cgroup counters and the filesystem's used bytes."""
        cpu, mem, peak, pids, ooms = self.cgroup.usage()
        return Usage(cpu, mem, peak, pids, ooms, disk.used(self.work))

    def wipe(self) -> None:
        """Kill everything, unmount and delete the disk, remove the cgroup."""
        if any(d.exists() for d in self.cgroup.dirs.values()):
            self.kill_all()
        disk.unmount(self.spec.lease, self.work)
        if self.egress is not None:
            self.egress.stop()
            self.egress = None
        if self.netns is not None:
            # Its last process is dead: unmounting the file lets the kernel free the netns.
            subprocess.run(["umount", str(self.netns)], capture_output=True, check=False)
            self.netns = None
        shutil.rmtree(self.dir, ignore_errors=True)
        self.cgroup.remove()
        self.runtime.release(self.spec.lease)
