"""A cgroup per lease: CPU, memory (no swap) and pids limits, joined before the workload
starts, killed as a whole. cgroup v2 where its controllers are available, v1 otherwise.

The plan of what to write (`plan`) and the reading of /proc (`find_layout`) are pure; the
rest writes files under /sys/fs/cgroup. Lease cgroups are made under the agent's own
cgroup (`<own>/idlegrid-ws/<lease>`), so whatever limits the agent itself stay above them.

On v2 a cgroup with processes cannot hand controllers to its children ("no internal
processes"): the agent's own cgroup must be delegated and the agent kept in a leaf beside
`idlegrid-ws`, or `parent` set to an empty delegated cgroup. That is refused with the
reason, never worked around by moving processes the agent does not own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from idlegrid.agent.workspace.base import Limits
from idlegrid.errors import SandboxUnavailable

NEEDED = ("cpu", "memory", "pids")
CPU_PERIOD_US = 100_000
SUBDIR = "idlegrid-ws"


@dataclass(frozen=True)
class Write:
    """One file of a lease's cgroup to write: which controller's hierarchy (v1; "" on v2),
    the file, the value; optional files are skipped where the kernel lacks them."""

    controller: str
    file: str
    value: str
    optional: bool = False


def plan(version: int, limits: Limits) -> list[Write]:
    """The writes that apply `limits`, in an order the kernel accepts."""
    quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
    mem = str(limits.memory_bytes)
    if version == 2:
        return [
            Write("", "cpu.max", f"{quota} {CPU_PERIOD_US}"),
            Write("", "memory.max", mem),
            Write("", "memory.swap.max", "0", optional=True),  # absent without swap support
            # An OOM kills the whole workload, not one process of it that others then wait on.
            Write("", "memory.oom.group", "1", optional=True),
            Write("", "pids.max", str(limits.pids)),
        ]
    return [
        Write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
        Write("cpu", "cpu.cfs_quota_us", str(quota)),
        # memsw (memory + swap) may not be below the memory limit: memory first. Equal
        # values mean no swap at all; without swap accounting swappiness 0 is what is left.
        Write("memory", "memory.limit_in_bytes", mem),
        Write("memory", "memory.memsw.limit_in_bytes", mem, optional=True),
        Write("memory", "memory.swappiness", "0", optional=True),
        Write("pids", "pids.max", str(limits.pids)),
    ]


@dataclass(frozen=True)
class Layout:
    """Where lease cgroups go: v2, one directory; v1, one per controller (cpu, memory,
    pids, and freezer/cpuacct when mounted)."""

    version: int
    parents: Mapping[str, Path]
    v2_root: Path | None = None


def find_layout(
    mounts: str, self_cgroup: str, v2_controllers: Mapping[str, str], parent: str = ""
) -> Layout:
    """The layout, from /proc/mounts, /proc/self/cgroup and each cgroup2 mount's
    cgroup.controllers; SandboxUnavailable naming what is missing."""
    own: dict[str, str] = {}
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for c in parts[1].split(",") if parts[1] else [""]:
                own[c] = parts[2]
    v2_mounts: list[str] = []
    v1: dict[str, str] = {}
    for line in mounts.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        if f[2] == "cgroup2":
            v2_mounts.append(f[1])
        elif f[2] == "cgroup":
            for opt in f[3].split(","):
                if opt in (*NEEDED, "freezer", "cpuacct"):
                    v1[opt] = f[1]
    for mount in v2_mounts:
        if set(NEEDED) <= set(v2_controllers.get(mount, "").split()):
            base = parent or (own.get("", "/").rstrip("/") + "/" + SUBDIR)
            return Layout(2, {"": Path(mount + base)}, Path(mount))
    missing = [c for c in NEEDED if c not in v1]
    if missing:
        seen = {m: v2_controllers.get(m, "") for m in v2_mounts}
        raise SandboxUnavailable(
            "bwrap",
            f"no cgroup controller for {', '.join(missing)}: cgroup2 mounts {seen or 'none'} "
            f"lack them and cgroup v1 mounts only {sorted(v1) or 'none'}",
        )
    parents = {c: Path(v1[c] + (parent or own.get(c, "/").rstrip("/") + "/" + SUBDIR)) for c in v1}
    return Layout(1, parents)


def host_layout(parent: str = "") -> Layout:
    """`find_layout` for this machine."""
    mounts = Path("/proc/mounts").read_text()
    v2 = {}
    for line in mounts.splitlines():
        f = line.split()
        if len(f) >= 3 and f[2] == "cgroup2":
            try:
                v2[f[1]] = (Path(f[1]) / "cgroup.controllers").read_text()
            except OSError:
                v2[f[1]] = ""
    return find_layout(mounts, Path("/proc/self/cgroup").read_text(), v2, parent)


class LeaseCgroup:
    """One lease's cgroup (one directory per v1 hierarchy)."""

    def __init__(self, layout: Layout, lease: str) -> None:
        self.layout = layout
        self.lease = lease
        self.dirs = {c: p / lease for c, p in layout.parents.items()}

    @property
    def procs_files(self) -> list[Path]:
        """Every cgroup.procs a process must join (its pid written to each)."""
        return sorted({d / "cgroup.procs" for d in self.dirs.values()})

    def _dir(self, controller: str) -> Path:
        return self.dirs["" if self.layout.version == 2 else controller]

    def create(self, limits: Limits) -> None:
        """Make the directories and write the limits."""
        if self.layout.version == 2:
            self._delegate()
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for w in plan(self.layout.version, limits):
            path = self._dir(w.controller) / w.file
            if w.optional and not path.exists():
                continue
            path.write_text(w.value)

    def _delegate(self) -> None:
        # Enable the controllers from the mount down to idlegrid-ws: each level hands them
        # to its children, and the lease's directory is a child of the last.
        root, base = self.layout.v2_root, self.layout.parents[""]
        assert root is not None
        rel = base.relative_to(root).parts
        for d in [root, *(root.joinpath(*rel[: i + 1]) for i in range(len(rel)))]:
            d.mkdir(exist_ok=True)
            have = set((d / "cgroup.subtree_control").read_text().split())
            want = [c for c in NEEDED if c not in have]
            if not want:
                continue
            try:
                (d / "cgroup.subtree_control").write_text(" ".join("+" + c for c in want))
            except OSError as e:
                why = "it holds processes" if e.errno == errno.EBUSY else os.strerror(e.errno or 0)
                raise SandboxUnavailable(
                    "bwrap",
                    f"cannot enable {want} below {d}: {why}; run the agent in a delegated "
                    f"cgroup (systemd Delegate=yes) from a leaf, or set the cgroup parent",
                ) from e

    def pids(self) -> list[int]:
        """Every process in the lease's cgroup now."""
        try:
            text = (self._dir("pids") / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process and wait until none is left (TimeoutError otherwise).
        v2 has cgroup.kill; on v1 the freezer (when mounted) stops a fork bomb from racing
        the kills, and without it the pids limit bounds how many rounds it takes."""
        d = self._dir("pids")
        kill_file = d / "cgroup.kill"
        freezer = self.dirs.get("freezer")
        deadline = time.monotonic() + timeout
        if self.layout.version == 2 and kill_file.exists():
            kill_file.write_text("1")
        elif freezer is not None and freezer.exists():
            (freezer / "freezer.state").write_text("FROZEN")
        while True:
            left = self.pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if freezer is not None and freezer.exists():
                # Killed while frozen, they die once thawed; freeze again for the next round.
                (freezer / "freezer.state").write_text("THAWED")
            if time.monotonic() > deadline:
                raise TimeoutError(f"lease {self.lease}: processes {left} outlived the kill")
            time.sleep(0.02)
            if self.pids() and freezer is not None and freezer.exists():
                (freezer / "freezer.state").write_text("FROZEN")
        if freezer is not None and freezer.exists():
            (freezer / "freezer.state").write_text("THAWED")

    def remove(self) -> None:
        """Remove the (empty) cgroup directories."""
        for d in self.dirs.values():
            for _ in range(50):  # a killed task may linger in the list for a moment
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    time.sleep(0.02)

    def usage(self) -> tuple[float | None, int | None, int | None, int | None, int | None]:
        """(cpu seconds, memory now, memory peak, pids, oom kills), None where unknown."""

        def read(controller: str, file: str) -> str | None:
            try:
                return (self._dir(controller) / file).read_text()
            except (OSError, KeyError):
                return None

        def stat(text: str | None, key: str) -> int | None:
            for line in (text or "").splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
            return None

        pids = read("pids", "pids.current")
        if self.layout.version == 2:
            usec = stat(read("cpu", "cpu.stat"), "usage_usec")
            mem, peak = read("memory", "memory.current"), read("memory", "memory.peak")
            ooms = stat(read("memory", "memory.events"), "oom_kill")
            cpu = usec / 1e6 if usec is not None else None
        else:
            ns = read("cpuacct", "cpuacct.usage") if "cpuacct" in self.dirs else None
            mem = read("memory", "memory.usage_in_bytes")
            peak = read("memory", "memory.max_usage_in_bytes")
            ooms = stat(read("memory", "memory.oom_control"), "oom_kill")
            cpu = int(ns) / 1e9 if ns else None
        return (
            cpu,
            int(mem) if mem else None,
            int(peak) if peak else None,
            int(pids) if pids else None,
            ooms,
        )
