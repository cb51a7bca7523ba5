"""Paths a consumer names inside a workspace: confined to `/work`. Pure.

`cp` writes and reads only under `/work`; a path that names a parent (`..`) or an absolute
path elsewhere is refused before anything reaches the provider (the extractor inside the
sandbox refuses such tar members too, and the sandbox could not write outside anyway).
"""

from __future__ import annotations

from pathlib import PurePosixPath

from idlegrid.errors import InvalidRequest

ROOT = PurePosixPath("/work")


def confine(path: str, *, param: str = "path") -> str:
    """`path` as an absolute path under /work (relative ones are taken from /work), or
    InvalidRequest naming `param` for `..`, NUL, or an absolute path outside /work."""
    if not path or "\x00" in path:
        raise InvalidRequest(f"{param}: a non-empty path without NUL", param=param)
    p = PurePosixPath(path)
    if ".." in p.parts:
        raise InvalidRequest(f"{param}: '..' may not appear in a workspace path", param=param)
    full = p if p.is_absolute() else ROOT / p
    if full != ROOT and ROOT not in full.parents:
        raise InvalidRequest(f"{param}: {path} is outside /work", param=param)
    return str(full)
