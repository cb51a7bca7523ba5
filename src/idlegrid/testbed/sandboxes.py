"""Set-up shared by the tests of the bwrap runtime: an agent data dir with a key file in it,
a wheelhouse with one tiny wheel that leases can read, the runtime over both, and a shell
line run in a workspace; and GPU device nodes for either runtime's passthrough tests. Needs
what the runtime needs (root, bubblewrap, cgroups)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from idlegrid.agent.workspace import open_runtime
from idlegrid.agent.workspace.bwrap import BwrapRuntime, BwrapWorkspace
from idlegrid.config import default_data_dir
from idlegrid.testbed.wheels import tiny_wheel

KEY = "SECRET-KEY-MATERIAL\n"


# A workspace's view of its GPUs: /dev's entries, then cuda=<visible> order=<device order>.
SHOW_GPUS = "ls /dev; echo cuda=$CUDA_VISIBLE_DEVICES order=$CUDA_DEVICE_ORDER"


def check_gpu_view(
    run: Callable[[str], tuple[int, str, str]], leased: int, others: Sequence[int], standin: bool
) -> None:
    """Assert what a workspace leased GPU `leased` sees (`run`: a shell line in it): that
    GPU's node, the host's device itself (writable, for a stand-in: a nodev mount would
    refuse the open), and nvidiactl; none of the `others`; CUDA told its nvidia-smi index."""
    code, out, err = run(SHOW_GPUS)
    assert code == 0, err
    names = out.split()
    assert f"nvidia{leased}" in names and "nvidiactl" in names, names
    assert not [f"nvidia{g}" for g in others if f"nvidia{g}" in names], names
    assert f"cuda={leased}" in names and "order=PCI_BUS_ID" in names, names
    host = os.stat(f"/dev/nvidia{leased}").st_rdev
    code, out, _ = run(f"stat -c '%t %T' /dev/nvidia{leased}")
    assert (code, [int(x, 16) for x in out.split()]) == (0, [os.major(host), os.minor(host)])
    if standin:
        code, out, _ = run(f"echo x > /dev/nvidia{leased} && echo wrote")
        assert (code, out.split()) == (0, ["wrote"])


@contextmanager
def gpu_device_nodes() -> Iterator[tuple[list[int], bool]]:
    """The host's GPU indices, and whether they are stand-ins: where the host has no
    /dev/nvidia* (no GPU), /dev/nvidia0, /dev/nvidia1 and /dev/nvidiactl are made as
    character devices that behave as /dev/null, and removed on the way out."""
    real = sorted(int(p.name[6:]) for p in Path("/dev").glob("nvidia[0-9]*"))
    if real:
        yield real, False
        return
    made = [Path("/dev/nvidia0"), Path("/dev/nvidia1"), Path("/dev/nvidiactl")]
    try:
        for node in made:
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            node.chmod(0o666)  # past the umask: every lease uid may open its GPUs
        yield [0, 1], True
    finally:
        for node in made:
            node.unlink(missing_ok=True)


def agent_dir(d: Path) -> Path:
    """`d` made to stand in for the agent's data dir: a key file (mode 0600) in it."""
    (d / "node-key").write_text(KEY)
    (d / "node-key").chmod(0o600)
    return d


def bwrap_runtime(root: Path, wheels: Path, agent: Path, **options: Any) -> BwrapRuntime:
    """A bwrap runtime over `root`, with a wheelhouse in `wheels` (igtiny 1.0) and `agent`
    and the default data dir as its secrets."""
    tiny_wheel(wheels).chmod(0o644)
    wheels.chmod(0o755)  # leases read it as their own uids
    rt = open_runtime("bwrap", root, wheels=wheels, secrets=[agent, default_data_dir()], **options)
    assert isinstance(rt, BwrapRuntime)
    return rt


def sh(w: BwrapWorkspace, script: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run `script` with /bin/sh in `w`: exit code, stdout, stderr."""
    code, out, err = w.exec(["/bin/sh", "-c", script]).run(timeout)
    return code, out.decode(), err.decode()


def py(w: BwrapWorkspace, source: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run Python `source` (argv `args`) with the workspace's python: exit code, stdout, stderr."""
    code, out, err = w.exec(["python", "-c", source, *args]).run(timeout)
    return code, out.decode(), err.decode()
