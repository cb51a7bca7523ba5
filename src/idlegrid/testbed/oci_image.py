"""A tiny OCI image made on this machine, for tests and benchmarks of the `podman` runtime
(no registry is reached): busybox-static's applets and the host's Debian `python3` with its
shared libraries and standard library (cp and port-forward run Python in the workspace),
imported with `podman import`. About 15 MB; a few seconds."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

TAG = "localhost/idlegrid-test:tiny"
PYTHON = Path("/usr/bin/python3")
SKIP = {"test", "idlelib", "tkinter", "ensurepip", "lib2to3", "pydoc_data", "turtledemo"}


def _libs(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    return [Path(m) for m in re.findall(r"(/\S+) \(0x", out.stdout)]


def build(tag: str = TAG) -> str:
    """Import the image as `tag` (made again each call) and return `tag`."""
    busybox = Path("/usr/bin/busybox")
    if not busybox.exists() or not PYTHON.exists():
        raise RuntimeError("the test image needs busybox-static and python3 (apt-get install)")
    python = PYTHON.resolve()
    version = python.name.removeprefix("python")
    stdlib = Path(f"/usr/lib/python{version}")
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def link(name: str, target: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)

        def directory(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        for d in ("bin", "usr", "usr/bin", "usr/lib", "etc", "tmp", "work", "proc", "dev", "sys"):
            directory(d, 0o1777 if d == "tmp" else 0o755)
        tar.add(busybox, "bin/busybox")
        for a in applets:
            if a != "busybox":
                link(f"bin/{a}", "busybox")
        tar.add(python, f"usr/bin/{python.name}")
        link("usr/bin/python3", python.name)
        link("usr/bin/python", python.name)
        for lib in _libs(python):
            tar.add(lib.resolve(), str(lib).lstrip("/"))
        tar.add(
            stdlib,
            str(stdlib).lstrip("/"),
            filter=lambda m: None if set(m.name.split("/")) & SKIP else m,
        )
        dynload = stdlib / "lib-dynload"
        for ext in dynload.glob("*.so") if dynload.exists() else ():
            for lib in _libs(ext):
                if not lib.exists() or str(lib).lstrip("/") in tar.getnames():
                    continue
                tar.add(lib.resolve(), str(lib).lstrip("/"))
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    subprocess.run(
        ["podman", "import", "--change", "ENV=PATH=/usr/bin:/bin", "-", tag],
        input=buf.getvalue(),
        capture_output=True,
        check=True,
    )
    return tag


def oci_runtime() -> str | None:
    """The OCI runtime tests ask podman for: `runc` where installed (crun refuses hosts
    whose cgroups are hybrid, v1 plus a v2 mount, as these VMs' are), else podman's own."""
    return "runc" if shutil.which("runc") else None
