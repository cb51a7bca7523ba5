"""The host uids a runtime's lease workloads run as (one per live lease), and the lease
directories under its root that no live lease owns: what `sweep` wipes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from idlegrid.agent.workspace.base import WorkspaceSpec


class LeaseUids:
    """One host uid per live lease, the lowest free from `first` up."""

    def __init__(self, first: int) -> None:
        self.first = first
        self._uids: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, lease: str) -> int:
        """A free uid for `lease`, held until `release`."""
        with self._lock:
            used = set(self._uids.values())
            uid = next(u for u in range(self.first, self.first + 1_000_000) if u not in used)
            self._uids[lease] = uid
            return uid

    def release(self, lease: str) -> None:
        """Forget a wiped lease's uid."""
        with self._lock:
            self._uids.pop(lease, None)

    def leftovers(self, root: Path) -> Iterator[tuple[Path, WorkspaceSpec]]:
        """Directories under `root` named as a lease but held by no live lease here (an
        earlier agent's, which died before wiping them), with a spec naming that lease."""
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            with self._lock:
                live = d.name in self._uids
            if live or not d.is_dir():
                continue
            try:
                yield d, WorkspaceSpec(d.name)
            except ValueError:
                continue  # not a lease's directory
