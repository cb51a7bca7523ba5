"""A lease's `/work`: an ext4 image of exactly the leased size, loop-mounted on the provider
(root only). Shared by the runtimes that isolate (`bwrap`, `podman`).

Why an ext4 image: the quota is the filesystem's size, enforced by the kernel (ENOSPC),
costs no memory (a tmpfs would be charged to the lease's memory limit) and needs no quota
tooling; a sparse image takes disk only as it fills. Making and mounting one takes tens of
milliseconds (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from idlegrid.errors import ProvisioningFailed


def run(lease: str, step: str, argv: Sequence[str]) -> None:
    """Run a provisioning command; ProvisioningFailed naming `step` if it fails."""
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise ProvisioningFailed(
            lease, step, (r.stderr or r.stdout).strip()[-2000:], exit_code=r.returncode
        )


def make(lease: str, image: Path, work: Path, size: int, uid: int) -> None:
    """A sparse ext4 image of `size` bytes mounted on `work`, owned by `uid`, mode 0700."""
    with open(image, "wb") as f:
        f.truncate(size)  # sparse: disk is taken as it fills
    # Lazy inode tables and journal: mkfs writes a few MB, not the whole image.
    run(
        lease,
        "disk",
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
         str(image)],
    )  # fmt: skip
    work.mkdir()
    run(lease, "disk", ["mount", "-o", "loop,nosuid,nodev,noatime", str(image), str(work)])
    (work / "lost+found").rmdir()
    os.chown(work, uid, uid)
    work.chmod(0o700)


def used(work: Path) -> int:
    """Bytes used on the mounted `/work` (0 when it is not there)."""
    try:
        st = os.statvfs(work)
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def unmount(lease: str, work: Path) -> None:
    """Unmount `work`, retrying while the last user's mount namespace closes, lazily at last."""
    if not os.path.ismount(work):
        return
    for _ in range(100):
        if subprocess.run(["umount", str(work)], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.02)
    run(lease, "wipe", ["umount", "--lazy", str(work)])
