"""A tiny OCI image made on this machine, for tests and benchmarks of the `podman` runtime
(no registry is reached): busybox-static's applets, the host's bash (the lease shell runs
`bash -i`) and the agent's own Python with their shared libraries and Python's standard
library (cp, shell and port-forward run Python in the workspace), imported with `podman
import`. About 100 MB; a few seconds."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

TAG = "localhost/idlegrid-test:tiny"
# Not needed in a workspace (tests, GUIs, the static libpython), or the agent's own packages.
SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"}
PREFIX = "usr/local"  # where the Python goes in the image


def _libs(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    return [Path(m) for m in re.findall(r"(/\S+) \(0x", out.stdout)]


def _skipped(name: str) -> bool:
    parts = name.split("/")
    return bool(set(parts) & SKIP) or any(
        p.startswith("config-") or p.startswith("_tkinter") for p in parts
    )


def build(tag: str = TAG) -> str:
    """Import the image as `tag` (made again each call) and return `tag`.

    Its Python is the one running this (the agent's, from its base prefix, without its
    packages), put under /usr/local: cp needs tarfile's extraction filters, which some
    distributions' Pythons (Debian 12's 3.11.2) lack."""
    busybox = Path("/usr/bin/busybox")
    if not busybox.exists():
        raise RuntimeError("the test image needs busybox-static (apt-get install busybox-static)")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = Path(sys.base_prefix) / "bin" / f"python{version}"
    stdlib = Path(sys.base_prefix) / "lib" / f"python{version}"
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        added: set[str] = set()

        def link(name: str, target: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)

        def directory(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def lib(path: Path) -> None:
            # System libraries keep their paths; others (a libpython of the agent's own
            # build) go where the loader looks without an ld.so.cache.
            system = str(path).startswith(("/lib", "/usr/lib"))
            name = str(path).lstrip("/") if system else f"usr/lib/{path.name}"
            if name not in added:
                added.add(name)
                tar.add(path.resolve(), name)

        for d in ("bin", "usr", "usr/bin", "usr/lib", "etc", "tmp", "work", "proc", "dev", "sys"):
            directory(d, 0o1777 if d == "tmp" else 0o755)
        tar.add(busybox, "bin/busybox")
        for a in applets:
            if a != "busybox":
                link(f"bin/{a}", "busybox")
        tar.add(python.resolve(), f"{PREFIX}/bin/python{version}")
        for alias in ("python3", "python"):
            link(f"usr/bin/{alias}", f"/{PREFIX}/bin/python{version}")
        for path in _libs(python):
            lib(path)
        bash = Path(shutil.which("bash") or "/bin/bash")  # the lease shell runs `bash -i`
        tar.add(bash.resolve(), "usr/bin/bash")
        for path in _libs(bash):
            lib(path)
        tar.add(
            stdlib,
            f"{PREFIX}/lib/python{version}",
            filter=lambda m: None if _skipped(m.name) else m,
        )
        for ext in (stdlib / "lib-dynload").glob("*.so"):
            if not _skipped(ext.name):
                for path in _libs(ext):
                    lib(path)
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    before = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(
        ["podman", "import", "--change", "ENV=PATH=/usr/local/bin:/usr/bin:/bin", "-", tag],
        input=buf.getvalue(),
        capture_output=True,
        check=True,
    )
    if before:
        # The tag moved on: the old image would stay behind untagged, 100 MB a run. One a
        # container still uses (another test run) stays, and podman says so: ignored.
        subprocess.run(["podman", "rmi", before], capture_output=True, check=False)
    return tag


def oci_runtime() -> str | None:
    """The OCI runtime tests ask podman for: `runc` where installed (crun refuses hosts
    whose cgroups are hybrid, v1 plus a v2 mount, as these VMs' are), else podman's own."""
    return "runc" if shutil.which("runc") else None
