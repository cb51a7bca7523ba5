"""The bwrap runtime's seccomp filter as data: its refusals are the ones docs/leases.md
lists, libseccomp compiles them once per process, and the sandbox's argv hands bwrap the
filter's fd only when there is one."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from idlegrid.agent.workspace import sandbox as sb
from idlegrid.agent.workspace import seccomp
from idlegrid.agent.workspace.base import WorkspaceSpec

DOCS = Path(__file__).parents[2] / "docs" / "leases.md"


def _documented() -> dict[str, set[str]]:
    """The Seccomp section's table: answer (EPERM, ENOSYS) → the backticked names."""
    text = DOCS.read_text()
    section = text[text.index("### Seccomp") :]
    section = section[: section.index("\n### ")]
    out: dict[str, set[str]] = {}
    for line in section.splitlines():
        if m := re.match(r"\| (EPERM|ENOSYS) \| (.*) \|$", line):
            out.setdefault(m[1], set()).update(re.findall(r"`([A-Za-z0-9_]+)`", m[2]))
    return out


def test_the_refusals_are_the_ones_the_docs_list() -> None:
    docs = _documented()
    rules = seccomp.rules()
    eperm = {r.syscall for r in rules if r.errno == errno.EPERM}
    enosys = {r.syscall for r in rules if r.errno == errno.ENOSYS}
    flags = {*seccomp.NS_FLAGS, "CLONE_NEWTIME"}
    assert docs["EPERM"] == eperm | flags
    assert docs["ENOSYS"] == enosys
    # What the brief of issue 18 names, whatever else is added.
    for name in ("keyctl", "bpf", "perf_event_open", "userfaultfd", "kexec_load", "mount",
                 "open_by_handle_at", "setns", "reboot", "swapon", "acct", "syslog"):  # fmt: skip
        assert name in eperm
    assert "ptrace" not in eperm | enosys  # allowed, as Docker does on kernels >= 4.8


def test_clone_and_unshare_are_refused_only_with_a_namespace_flag() -> None:
    flagged = [r for r in seccomp.rules() if r.flag is not None]
    assert {r.syscall for r in flagged} == {"clone", "unshare"}
    assert all(r.errno == errno.EPERM for r in flagged)
    user = seccomp.NS_FLAGS["CLONE_NEWUSER"]
    assert {r.syscall for r in flagged if r.flag == user} == {"clone", "unshare"}
    # In clone's flags the low byte is the exit signal: CLONE_NEWTIME is unshare's only.
    assert [r.syscall for r in flagged if r.flag == seccomp.CLONE_NEWTIME] == ["unshare"]
    assert not any(r.syscall in ("clone", "unshare") and r.flag is None for r in seccomp.rules())


def test_libseccomp_compiles_the_filter_once_per_process() -> None:
    code = seccomp.bpf()
    assert 0 < len(code) <= seccomp.PAGE and len(code) % 8 == 0
    assert seccomp.bpf() is code


def test_bwrap_gets_the_filters_fd_only_when_there_is_one() -> None:
    host = sb.Host({"/usr": ""}, frozenset(), Path("/usr"), "3.11", None, Path("/stage"))

    def argv(fd: int | None) -> list[str]:
        return sb.command(
            host, WorkspaceSpec("L"), uid=200_001, procs=[], work=Path("/w"), wheels=None,
            argv=["true"], env={}, cwd="/work", seccomp_fd=fd,
        )  # fmt: skip

    box = argv(7)
    i, b = box.index("--seccomp"), box.index("bwrap")
    assert box[i + 1] == "7" and b < i < box.index("--", b)  # bwrap's option, not argv's
    assert "--seccomp" not in argv(None)
