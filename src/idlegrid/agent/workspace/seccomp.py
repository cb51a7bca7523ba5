"""The seccomp filter of the `bwrap` runtime: a denylist in the style of Docker's and
podman's default profile. What a container may not do is refused; everything else is
allowed, so that a shell, pip, Python and torch work unchanged.

The filter is compiled by libseccomp (`pyseccomp`: ctypes over the system's libseccomp2),
never written by hand, once per agent process (`bpf`), and handed to bwrap as `--seccomp
FD`. bwrap loads it after its own set-up (its mounts are done by then), just before it
execs the workload, and into the sandbox's pid 1 too: nothing in the sandbox runs without it.

Refusals are ERRNO, not KILL, so tools fall back: EPERM for what is forbidden, ENOSYS for
what a program may probe and do without (clone3: glibc falls back to clone, whose flags
the filter can read; io_uring: runtimes fall back to epoll and threads). Only the native
ABI is in the filter: a syscall through another (x86's 32-bit `int 0x80`, x32) kills the
process, as libseccomp does for any architecture a filter does not name.

ptrace, process_vm_readv/writev and kcmp stay allowed, as in Docker on kernels >= 4.8:
since 4.8 the kernel runs seccomp again after a tracer changes a syscall, so a traced
process cannot be steered past the filter, and the sandbox's pid 1 carries the same
filter; strace and gdb then work in a lease. The lease's uid, user and PID namespaces
keep a tracer to the lease's own processes.
"""

from __future__ import annotations

import errno
import functools
import tempfile
from dataclasses import dataclass

from idlegrid.errors import SandboxUnavailable

# The kernel's keyring, whole: keys are not namespaced and have had many bugs.
KEYRING = ("keyctl", "add_key", "request_key")
# Kernel programming and observation from inside: eBPF, perf counters, fault handling in
# user space (a classic way to win a kernel race), the kernel log, dcookies.
KERNEL = ("bpf", "perf_event_open", "userfaultfd", "syslog", "lookup_dcookie")
# Loading, unloading and replacing the kernel; rebooting; swap; process accounting; quotas.
SYSTEM = (
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "iopl", "ioperm", "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl",
    "create_module", "get_kernel_syms", "query_module",
)  # fmt: skip
# Filesystems: no new mounts, old or new API; no file handles (they open files by inode,
# past the mount namespace: the "shocker" escape).
MOUNTS = (
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "open_tree", "mount_setattr", "open_by_handle_at",
    "name_to_handle_at",
)  # fmt: skip
# Joining another process's namespaces.
NAMESPACES = ("setns",)
EPERM = (*KEYRING, *KERNEL, *SYSTEM, *MOUNTS, *NAMESPACES)
# Refused as "not implemented": programs probe these and fall back.
ENOSYS = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")

# New namespaces of any kind (a user namespace above all: the kernel surface it opens is
# where most unprivileged escapes start). The bits of clone's and unshare's first argument.
NS_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
CLONE_NEWTIME = 0x00000080  # unshare only: in clone's flags these bits are the exit signal
FLAGGED = ("clone", "unshare")  # refused (EPERM) when a namespace flag is set
PAGE = 4096  # the filter must fit one (bwrap.py writes it into a pipe before the exec)


@dataclass(frozen=True)
class Rule:
    """One refusal: `syscall` fails with `errno`, always or when its first argument has
    `flag` set (the flags of clone on x86-64 and arm64, and of unshare)."""

    syscall: str
    errno: int
    flag: int | None = None


def rules() -> list[Rule]:
    """Every refusal of the filter, in the order added (what docs/leases.md lists)."""
    out = [Rule(s, errno.EPERM) for s in EPERM]
    out += [Rule(s, errno.ENOSYS) for s in ENOSYS]
    for s in FLAGGED:
        flags = [*NS_FLAGS.values(), *([CLONE_NEWTIME] if s == "unshare" else [])]
        out += [Rule(s, errno.EPERM, f) for f in flags]
    return out


@functools.cache
def bpf() -> bytes:
    """The compiled filter (classic BPF for `bwrap --seccomp`), built once per process;
    SandboxUnavailable naming libseccomp when it cannot be built here."""
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError, OSError) as e:
        # pyseccomp raises RuntimeError when it finds no libseccomp.so.2.
        raise SandboxUnavailable(
            "bwrap",
            f"no seccomp filter: libseccomp cannot be loaded ({e}); "
            "apt-get install libseccomp2 and pip install pyseccomp",
        ) from e
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # another ABI: no quiet way around
    for r in rules():
        if sc.resolve_syscall(sc.Arch.NATIVE, r.syscall) == -1:  # __NR_SCMP_ERROR
            # A name libseccomp does not know (not one absent on this arch, < -1): refuse
            # rather than leave a hole in the denylist.
            raise SandboxUnavailable("bwrap", f"libseccomp does not know {r.syscall}")
        args = [] if r.flag is None else [sc.Arg(0, sc.MASKED_EQ, r.flag, r.flag)]
        f.add_rule(sc.ERRNO(r.errno), r.syscall, *args)
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        code = out.read()
    if not code or len(code) % 8 or len(code) > PAGE:
        raise SandboxUnavailable("bwrap", f"libseccomp exported {len(code)} bytes of BPF")
    return code
