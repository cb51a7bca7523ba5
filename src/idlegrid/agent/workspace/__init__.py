"""Workspaces of leases on a provider, behind one interface (`base.Runtime`), chosen by name:

    bwrap   a bubblewrap sandbox per lease, cgroup limits, an ext4 /work of the leased size
    podman  an OCI container per lease from an image the provider has, the same limits and /work
    local   a plain subprocess in a private directory: isolates nothing, dev and tests only

Imports of a runtime happen in its branch, so `import idlegrid.agent.workspace` touches nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from idlegrid.agent.workspace.base import Runtime

RUNTIMES = ("bwrap", "podman", "local")


def open_runtime(name: str, root: Path, **options: Any) -> Runtime:
    """The runtime called `name`, keeping its workspaces under `root`; there is no default:
    `local` isolates nothing and must be asked for (with isolates_nothing=True)."""
    if name == "bwrap":
        from idlegrid.agent.workspace.bwrap import BwrapRuntime

        return BwrapRuntime(root, **options)
    if name == "podman":
        from idlegrid.agent.workspace.podman import PodmanRuntime

        return PodmanRuntime(root, **options)
    if name == "local":
        from idlegrid.agent.workspace.local import LocalRuntime

        return LocalRuntime(root, **options)
    raise ValueError(f"no workspace runtime {name!r}; there are {', '.join(RUNTIMES)}")
