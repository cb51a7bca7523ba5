"""The Python environment of a workspace: a venv in /work over the provider's Python, which
also sees the agent's own packages (torch, numpy) read-only, plus the lease's `--pip`
requirements. `venv_script` is pure: the shell script the workspace runs at start."""

from __future__ import annotations

import shlex
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

PTH = "_idlegrid_provider.pth"


def venv_script(
    python: str,
    version: str,
    provider_site: str | None,
    venv: str,
    pip: Sequence[str],
    wheels: str | None,
    index: bool = False,
) -> str:
    """`sh -c` text: make the venv (no pip of its own: the provider's is importable, which
    saves seconds), point it at the provider's site-packages (after its own, so what the
    lease installs wins), then install `pip` from the wheelhouse, or with `index` (a
    workspace with egress and no wheelhouse) from pip's default index over the network."""
    q = shlex.quote
    lines = ["set -e", f"{q(python)} -m venv --without-pip --system-site-packages {q(venv)}"]
    if provider_site:
        pth = f"{venv}/lib/python{version}/site-packages/{PTH}"
        lines.append(f"echo {q(provider_site)} > {q(pth)}")
    if pip:
        if wheels is None and not index:
            raise ValueError("pip requirements need a wheelhouse: this workspace has no network")
        reqs = " ".join(q(r) for r in pip)
        source = f"--no-index --find-links {q(wheels)}" if wheels is not None else "--"
        lines.append(
            f"{q(venv + '/bin/python')} -m pip install --quiet --disable-pip-version-check "
            f"{source} {reqs}"
        )
    return "\n".join(lines)


def provider_python() -> tuple[Path, str, Path | None]:
    """The agent's Python: its base prefix, its version, and its venv's site-packages (None
    when it runs from no venv)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = Path(sysconfig.get_paths()["purelib"]) if sys.prefix != sys.base_prefix else None
    return Path(sys.base_prefix), version, site
