"""The command line that starts one command in a lease's sandbox. Pure: it takes what the
host has (`Host`) and returns argv; `bwrap.py` runs it.

Three programs run in a chain, each `exec`ing the next, so the workload's outermost
process is the agent's own child and nothing is left between:

1. `sh` writes its own pid into the lease's cgroup.procs, so everything after is limited
   from its first instruction (no window in which the workload runs unlimited);
2. `unshare --mount` + `sh` (still root) bind the host paths the sandbox needs (the lease's
   `/work`, the provider's Python, a wheelhouse) onto a fixed stage directory, in a
   private mount namespace: the workload's uid never walks host paths such as `/root`;
3. `setpriv` drops to the lease's own unprivileged uid, then `bwrap` builds the sandbox
   from the stage and the read-only system view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from idlegrid.agent.workspace.base import WorkspaceSpec

SANDBOX_UID = 1000  # the uid and gid the workload sees; outside it is the lease's own uid
PYTHON_DIR = "/opt/idlegrid/python"
SITE_DIR = "/opt/idlegrid/site-packages"
WHEELS_DIR = "/opt/idlegrid/wheels"
VENV = "/work/.venv"
PASSWD = f"work:x:{SANDBOX_UID}:{SANDBOX_UID}:workspace:/work:/bin/sh\n"
GROUP = f"work:x:{SANDBOX_UID}:\n"

# The system, read-only: programs and libraries, and the few files of /etc that they
# read. Never /root, /home, /var, /run, /srv or /opt of the host, where data and keys live.
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/mime.types",
)
GPU_SHARED = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
# CUDA numbers GPUs fastest first unless told otherwise; the leased indices are nvidia-smi's
# (PCI bus order, as /dev/nvidiaN), so on a provider with unlike GPUs index 1 would else
# name a GPU whose node the workspace does not have.
CUDA_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

JOIN = 'for f; do shift; [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; done; exec "$@"'
STAGE = (
    'while [ "$1" != -- ]; do o=nosuid,nodev; [ "$3" = ro ] && o=ro,$o; '
    'mount --bind -o "$o" "$1" "$2" || exit 125; shift 3; done; shift; exec "$@"'
)


@dataclass(frozen=True)
class Host:
    """What the provider's machine has that the sandbox uses: its system paths (a path to
    its symlink target, "" for a real directory or file; absent ones left out), its GPU
    device nodes, and the provider's Python (base prefix, version, the agent's venv
    site-packages when it runs from one)."""

    system: Mapping[str, str]
    devices: frozenset[str]
    python_prefix: Path
    python_version: str
    python_site: Path | None
    stage: Path


@dataclass(frozen=True)
class Bind:
    """A host path bound onto `stage/name` (by root), then onto `dest` in the sandbox."""

    source: Path
    name: str
    dest: str
    writable: bool = False


def python_exe(host: Host) -> str:
    """The provider's Python as the sandbox sees it."""
    if _under_usr(host.python_prefix):
        return str(host.python_prefix / "bin" / f"python{host.python_version}")
    return f"{PYTHON_DIR}/bin/python{host.python_version}"


def _under_usr(p: Path) -> bool:
    return p == Path("/usr") or Path("/usr") in p.parents


def binds(host: Host, work: Path, wheels: Path | None) -> list[Bind]:
    """The host paths one lease's sandbox sees beyond the system view."""
    out = [Bind(work, "work", "/work", writable=True)]
    if not _under_usr(host.python_prefix):  # under /usr it is already in the system view
        out.append(Bind(host.python_prefix, "python", PYTHON_DIR))
    if host.python_site is not None:
        out.append(Bind(host.python_site, "site", SITE_DIR))
    if wheels is not None:
        out.append(Bind(wheels, "wheels", WHEELS_DIR))
    return out


def system_args(host: Host) -> list[str]:
    """The read-only system view, /proc, a minimal /dev, /etc/passwd naming the sandbox user."""
    args: list[str] = []
    for path in (*SYSTEM, *ETC):
        if path not in host.system:
            continue
        target = host.system[path]
        args += ["--symlink", target, path] if target else ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--ro-bind", str(host.stage / "passwd"), "/etc/passwd"]
    args += ["--ro-bind", str(host.stage / "group"), "/etc/group"]
    return args


def gpu_args(gpus: Sequence[int], devices: frozenset[str]) -> tuple[list[str], dict[str, str]]:
    """Device binds for the leased GPUs (and the shared control nodes, when there are any),
    and the environment that names them; the other GPUs' nodes are simply absent."""
    nodes = [f"/dev/nvidia{g}" for g in gpus if f"/dev/nvidia{g}" in devices]
    if nodes:
        nodes += [d for d in GPU_SHARED if d in devices]
    args = [a for n in nodes for a in ("--dev-bind", n, n)]
    # Empty when none is leased: CUDA then sees no device even if a node were reachable.
    return args, {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus), **CUDA_ORDER}


def base_env(host: Host, spec: WorkspaceSpec) -> dict[str, str]:
    """The whole environment a workload starts with (--clearenv drops the agent's)."""
    env = {
        "PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/work",
        "USER": "work",
        "LOGNAME": "work",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "VIRTUAL_ENV": VENV,
        "PIP_NO_CACHE_DIR": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if not _under_usr(host.python_prefix):
        env["LD_LIBRARY_PATH"] = f"{PYTHON_DIR}/lib"  # its libpython, wherever it was built
    env.update(gpu_args(spec.gpus, host.devices)[1])
    return env


def command(
    host: Host,
    spec: WorkspaceSpec,
    *,
    uid: int,
    procs: Sequence[Path],
    work: Path,
    wheels: Path | None,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    netns: Path | None = None,
    seccomp_fd: int | None = None,
) -> list[str]:
    """The full argv: join the cgroup, stage the binds, drop to `uid`, enter the sandbox.

    With `netns` (the lease's persistent network namespace, only `lo` in it), every exec of
    the lease shares that one network: a server one command starts on 127.0.0.1 is
    reachable from the next (port-forwarding needs this); still nothing of the host's.

    With `seccomp_fd` (an fd the command inherits, holding the compiled filter: seccomp.py),
    bwrap loads that filter just before it execs `argv`."""
    if not argv:
        raise ValueError("an empty command")
    for k, v in env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ValueError(f"an environment variable cannot be named {k!r} or hold NUL")
    if spec.egress and netns is None:
        raise ValueError("outbound network needs the lease's own network namespace")
    mounts = binds(host, work, wheels)
    stage = [
        a
        for b in mounts
        for a in (str(b.source), str(host.stage / b.name), "rw" if b.writable else "ro")
    ]
    box = [
        "bwrap",
        "--unshare-all",  # user, mount, pid, ipc, uts, cgroup and network namespaces
        *(["--share-net"] if netns is not None else []),  # the lease's own netns, entered below
        "--unshare-user",
        "--disable-userns",  # no nested user namespaces: less kernel reachable from inside
        "--uid", str(SANDBOX_UID),
        "--gid", str(SANDBOX_UID),
        "--hostname", "workspace",
        "--die-with-parent",  # the agent gone, its workloads go too
        "--new-session",  # no TIOCSTI into the agent's terminal
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        *system_args(host),
        "--size", str(spec.limits.memory_bytes), "--tmpfs", "/tmp",  # charged to its memory
    ]  # fmt: skip
    for b in mounts:
        box += ["--bind" if b.writable else "--ro-bind", str(host.stage / b.name), b.dest]
    if spec.egress:
        box += ["--ro-bind", str(host.stage / "resolv.conf"), "/etc/resolv.conf"]
    box += gpu_args(spec.gpus, host.devices)[0]
    box += ["--chdir", cwd, "--clearenv"]
    for k, v in {**base_env(host, spec), **env}.items():
        box += ["--setenv", k, v]
    box += ["--", *argv]
    drop = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "--no-new-privs"]
    return [
        "/bin/sh", "-c", JOIN, "join", *map(str, procs), "--",
        *(["nsenter", f"--net={netns}", "--"] if netns is not None else []),
        "unshare", "--mount", "--propagation", "private", "--",
        "/bin/sh", "-c", STAGE, "stage", *stage, "--",
        *drop, *box,
    ]  # fmt: skip
