"""The pure parts of the workspace runtime: cgroup plans and layouts, the sandbox's argv
(GPUs included: this machine has none), the venv script, and the local runtime's refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from idlegrid.agent.workspace import open_runtime
from idlegrid.agent.workspace import sandbox as sb
from idlegrid.agent.workspace.base import Limits, WorkspaceSpec, killed_by
from idlegrid.agent.workspace.cgroups import find_layout, plan
from idlegrid.agent.workspace.pyenv import venv_script
from idlegrid.errors import SandboxUnavailable

LIMITS = Limits(cpus=1.5, memory_bytes=1 << 30, pids=100, disk_bytes=1 << 30)

# This VM's /proc/mounts and /proc/self/cgroup (docs/leases.md): v1 controllers, an empty v2.
HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
HYBRID_SELF = "8:pids:/\n6:freezer:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"


def test_v2_plan_caps_cpu_memory_swap_and_pids() -> None:
    writes = {w.file: w.value for w in plan(2, LIMITS)}
    assert writes == {
        "cpu.max": "150000 100000",
        "memory.max": str(1 << 30),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "pids.max": "100",
    }


def test_v1_plan_sets_memory_before_memsw_and_turns_swap_off() -> None:
    writes = [(w.controller, w.file, w.value) for w in plan(1, LIMITS)]
    files = [f for _, f, _ in writes]
    assert files.index("memory.limit_in_bytes") < files.index("memory.memsw.limit_in_bytes")
    assert ("cpu", "cpu.cfs_quota_us", "150000") in writes
    assert ("memory", "memory.swappiness", "0") in writes and ("pids", "pids.max", "100") in writes


def test_the_layout_of_a_hybrid_host_is_v1_under_the_agents_own_cgroups() -> None:
    layout = find_layout(HYBRID_MOUNTS, HYBRID_SELF, {"/sys/fs/cgroup/unified": ""})
    assert layout.version == 1
    assert layout.parents["memory"] == Path("/sys/fs/cgroup/memory/process_api/abc/idlegrid-ws")
    assert layout.parents["pids"] == Path("/sys/fs/cgroup/pids/idlegrid-ws")
    assert "freezer" in layout.parents


def test_v2_is_chosen_where_its_controllers_are() -> None:
    mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"
    ctl = {"/sys/fs/cgroup": "cpuset cpu io memory pids"}
    layout = find_layout(mounts, "0::/system.slice/idlegrid.service\n", ctl)
    assert layout.version == 2 and layout.v2_root == Path("/sys/fs/cgroup")
    assert layout.parents[""] == Path("/sys/fs/cgroup/system.slice/idlegrid.service/idlegrid-ws")
    assert find_layout(mounts, "0::/\n", ctl, parent="/leases").parents[""] == Path(
        "/sys/fs/cgroup/leases"
    )


def test_no_controllers_is_refused_with_what_was_found() -> None:
    with pytest.raises(SandboxUnavailable) as err:
        find_layout("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", "0::/\n", {"/sys/fs/cgroup": "io"})
    assert "cpu, memory, pids" in err.value.reason and "'io'" in err.value.reason


def _host(devices: frozenset[str] = frozenset()) -> sb.Host:
    system = {"/usr": "", "/bin": "usr/bin", "/lib": "usr/lib", "/etc/ssl": ""}
    return sb.Host(
        system,
        devices,
        Path("/root/.pyenv/versions/3.11.7"),
        "3.11",
        Path("/srv/agent/.venv/lib/python3.11/site-packages"),
        Path("/run/idlegrid/stage"),
    )


def _argv(spec: WorkspaceSpec, host: sb.Host | None = None) -> list[str]:
    return sb.command(
        host or _host(),
        spec,
        uid=200_001,
        procs=[Path("/cg/pids/L/cgroup.procs"), Path("/cg/memory/L/cgroup.procs")],
        work=Path("/var/lib/ws/L/work"),
        wheels=None,
        argv=["python", "-c", "print(1)"],
        env={"A": "b"},
        cwd="/work",
    )


def test_the_chain_joins_the_cgroup_first_then_stages_then_drops_to_the_lease_uid() -> None:
    argv = _argv(WorkspaceSpec("L"))
    assert argv[:5] == ["/bin/sh", "-c", sb.JOIN, "join", "/cg/pids/L/cgroup.procs"]
    i_unshare, i_setpriv, i_bwrap = (argv.index(x) for x in ("unshare", "setpriv", "bwrap"))
    assert i_unshare < i_setpriv < i_bwrap
    assert argv[i_setpriv : i_setpriv + 5] == ["setpriv", "--reuid", "200001", "--regid", "200001"]
    stage = argv[argv.index(sb.STAGE) + 2 : i_setpriv - 1]
    assert stage[:3] == ["/var/lib/ws/L/work", "/run/idlegrid/stage/work", "rw"]
    assert stage[3:6] == ["/root/.pyenv/versions/3.11.7", "/run/idlegrid/stage/python", "ro"]
    box = argv[i_bwrap:]
    for flag in ("--unshare-all", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in box
    assert "--share-net" not in box
    # The host's /root appears only as a staged source, never as a sandbox path.
    dests = [box[i + 2] for i, a in enumerate(box) if a in ("--bind", "--ro-bind")]
    assert not any(d.startswith(("/root", "/home", "/var", "/srv")) for d in dests)
    assert box[box.index("--") + 1 :] == ["python", "-c", "print(1)"]
    env = {box[i + 1]: box[i + 2] for i, a in enumerate(box) if a == "--setenv"}
    assert env["A"] == "b" and env["CUDA_VISIBLE_DEVICES"] == "" and env["HOME"] == "/work"
    assert env["LD_LIBRARY_PATH"] == "/opt/idlegrid/python/lib"


def test_leased_gpus_only_are_passed_through_with_the_control_nodes() -> None:
    devices = frozenset(
        {"/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidiactl", "/dev/nvidia-uvm"}
    )
    args, env = sb.gpu_args([2, 0], devices)
    bound = [args[i + 1] for i, a in enumerate(args) if a == "--dev-bind"]
    assert bound == ["/dev/nvidia2", "/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    # nvidia-smi's numbering (as /dev/nvidiaN), not CUDA's fastest-first default
    assert env == {"CUDA_VISIBLE_DEVICES": "2,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert sb.gpu_args([], devices)[1]["CUDA_VISIBLE_DEVICES"] == ""
    assert sb.gpu_args([5], devices)[0] == []  # a node the host lacks is not invented
    box = _argv(WorkspaceSpec("L", gpus=(1,)), _host(devices))
    assert "/dev/nvidia1" in box and "/dev/nvidia0" not in box and "/dev/nvidia2" not in box


def test_bad_commands_env_and_egress_are_refused() -> None:
    with pytest.raises(ValueError, match="egress|network"):
        _argv(WorkspaceSpec("L", egress=True))
    with pytest.raises(ValueError):
        sb.command(
            _host(), WorkspaceSpec("L"), uid=1, procs=[], work=Path("/w"), wheels=None,
            argv=[], env={}, cwd="/work",
        )  # fmt: skip
    with pytest.raises(ValueError):
        sb.command(
            _host(), WorkspaceSpec("L"), uid=1, procs=[], work=Path("/w"), wheels=None,
            argv=["true"], env={"A=B": "x"}, cwd="/work",
        )  # fmt: skip


@pytest.mark.parametrize("lease", ["", "../x", "a/b", "a b"])
def test_a_lease_id_cannot_name_a_path(lease: str) -> None:
    with pytest.raises(ValueError):
        WorkspaceSpec(lease)


def test_limits_too_small_to_run_are_refused() -> None:
    with pytest.raises(ValueError):
        Limits(pids=2)
    with pytest.raises(ValueError):
        Limits(disk_bytes=1 << 20)


def test_the_venv_script_reuses_the_providers_packages_and_installs_offline() -> None:
    s = venv_script("/opt/p/bin/python3.11", "3.11", "/opt/site", "/work/.venv", ("a==1",), "/w")
    assert "-m venv --without-pip --system-site-packages /work/.venv" in s
    assert "echo /opt/site > /work/.venv/lib/python3.11/site-packages/_idlegrid_provider.pth" in s
    assert "--no-index --find-links /w a==1" in s
    with pytest.raises(ValueError, match="wheelhouse"):
        venv_script("py", "3.11", None, "/work/.venv", ("a",), None)


def test_exit_codes_name_their_signal() -> None:
    assert killed_by(137) is not None and killed_by(137).name == "SIGKILL"
    assert killed_by(0) is None and killed_by(7) is None


def test_the_local_runtime_must_be_asked_for_by_name_and_told_it_isolates_nothing(
    tmp_path: Path,
) -> None:
    with pytest.raises(SandboxUnavailable, match="isolates nothing"):
        open_runtime("local", tmp_path)
    with pytest.raises(ValueError, match="no workspace runtime"):
        open_runtime("oci", tmp_path)
