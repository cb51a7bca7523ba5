"""File copy in and out of a workspace: tar streams through an exec of the workspace's own
Python. The destination is confined to /work by the coordinator (core/lease/paths.py)
before anything runs; the extractor refuses any member that names `..` or an absolute
path, and applies tarfile's `data` filter (no links out, no devices, no setuid)."""

from __future__ import annotations

from idlegrid.core.lease.paths import confine

EXTRACT = r"""
import os, sys, tarfile
dest = sys.argv[1]
os.makedirs(dest, exist_ok=True)
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|*") as tar:
    for m in tar:
        parts = m.name.replace("\\", "/").split("/")
        if m.name.startswith("/") or ".." in parts:
            why = "a member may not name '..' or an absolute path"
            print(f"refused {m.name!r}: {why}", file=sys.stderr)
            sys.exit(3)
        try:
            tar.extract(m, dest, filter="data")
        except tarfile.FilterError as exc:
            print(f"refused {m.name!r}: {exc}", file=sys.stderr)
            sys.exit(3)
"""

PACK = r"""
import os, sys, tarfile
src = sys.argv[1]
if not os.path.exists(src):
    print(f"{src}: no such file or directory", file=sys.stderr)
    sys.exit(2)
with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as tar:
    tar.add(src, arcname=os.path.basename(src.rstrip("/")) or ".")
"""


def argv_in(path: str) -> list[str]:
    """The exec that unpacks a tar stream on stdin into `path` (confined to /work)."""
    return ["python", "-c", EXTRACT, confine(path)]


def argv_out(path: str) -> list[str]:
    """The exec that writes `path` (confined to /work) as a tar stream on stdout."""
    return ["python", "-c", PACK, confine(path)]
