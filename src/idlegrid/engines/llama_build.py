"""How llama-cpp-python is built for this machine: named CPU variants, GPU backends, a keyed wheel.

llama-cpp-python's own build compiles llama.cpp with `-march=native`: the wheel then holds
whatever the build host's CPUID listed, AMX tile kernels included, and dies with SIGILL on a
machine (or a VM) that has not enabled that state. pip caches the wheel by version only, so
one native build poisons every later install. Here every build names its CPU variant, a fixed
instruction-set level; its wheel is stored under a key of every flag that went into it, and
installed from there, never from pip's cache. The variant is also part of the determinism
class (`variant_of`), because AVX2 and AVX-512 kernels give different decode numbers.

Run with the system Python before idlegrid is installed (`scripts/bootstrap`), so this module
uses the standard library only:

    python3 src/idlegrid/engines/llama_build.py install --python .venv/bin/python
    .venv/bin/python -m idlegrid.engines.llama_build prove
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
BACKENDS = ("cpu", "cuda", "metal", "vulkan")
MARKER = "idlegrid-llama-build.json"  # in the venv: what the installed wheel was built with
PINNED = "idlegrid-llama-variant"  # in the venv: the safe variant, after the default crashed

_X86_OFF = [
    "AVX",
    "AVX2",
    "BMI2",
    "FMA",
    "F16C",
    "AVX_VNNI",
    "AVX512",
    "AVX512_VBMI",
    "AVX512_VNNI",
    "AVX512_BF16",
    "AMX_TILE",
    "AMX_INT8",
    "AMX_BF16",
]
_V3 = ["AVX", "AVX2", "BMI2", "FMA", "F16C"]
# name -> (GGML_* switches on, /proc/cpuinfo flags the CPU must list). Everything not on is off:
# AMX never, since its tile state needs the OS's consent that CPUID does not show.
CPU_VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    "x86-64": ([], []),
    "x86-64-v3": (_V3, ["avx", "avx2", "bmi2", "fma", "f16c"]),
    "x86-64-v4": (
        [*_V3, "AVX512"],
        [
            "avx",
            "avx2",
            "bmi2",
            "fma",
            "f16c",
            "avx512f",
            "avx512cd",
            "avx512vl",
            "avx512dq",
            "avx512bw",
        ],
    ),
    "arm64": ([], []),  # the compiler's armv8-a baseline: NEON
}
SAFE_VARIANT = {"x86_64": "x86-64", "aarch64": "arm64", "arm64": "arm64"}
# The canonical build per architecture: one determinism class for most providers. AVX-512
# decodes 2-5 % faster here (docs/benchmarks.md, "llama.cpp builds"): not worth a second
# class that no AVX2 verifier may audit, so it is opt-in.
CANONICAL = {"x86_64": "x86-64-v3", "aarch64": "arm64", "arm64": "arm64"}
_GPU_FLAGS = {
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
    "cpu": [],
}


class BuildError(Exception):
    """The engine could not be built or proven on this machine."""


def machine() -> str:
    """The CPU architecture as the kernel names it (x86_64, aarch64, arm64)."""
    return platform.machine().lower()


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Instruction-set flags the kernel lists for this CPU (empty where there is no cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def default_variant(arch: str | None = None, flags: set[str] | None = None) -> str:
    """The canonical variant this CPU runs, else the safe baseline of its architecture."""
    arch = arch or machine()
    flags = cpu_flags() if flags is None else flags
    canonical = CANONICAL.get(arch)
    if canonical is None:
        raise BuildError(f"no llama.cpp CPU variant is defined for the {arch} architecture")
    needed = CPU_VARIANTS[canonical][1]
    return canonical if set(needed) <= flags else SAFE_VARIANT[arch]


def cmake_args(backend: str, variant: str) -> list[str]:
    """CMake flags for one backend and CPU variant; never -march=native."""
    if backend not in BACKENDS:
        raise BuildError(
            f"IDLEGRID_LLAMA_BACKEND must be one of {', '.join(BACKENDS)}, not {backend!r}"
        )
    if variant not in CPU_VARIANTS:
        raise BuildError(
            f"IDLEGRID_LLAMA_CPU must be one of {', '.join(CPU_VARIANTS)}, not {variant!r}"
        )
    args = ["-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF"]
    if variant.startswith("x86-64"):
        on = set(CPU_VARIANTS[variant][0])
        args += [f"-DGGML_{f}={'ON' if f in on else 'OFF'}" for f in _X86_OFF]
    return args + _GPU_FLAGS[backend]


def build_key(backend: str, variant: str, python_tag: str) -> str:
    """A name for one wheel: every input of its build, hashed."""
    facts = {
        "llama-cpp-python": LLAMA_CPP_PYTHON,
        "backend": backend,
        "variant": variant,
        "cmake": cmake_args(backend, variant),
        "python": python_tag,
        "arch": machine(),
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{LLAMA_CPP_PYTHON}-{backend}-{variant}-{digest}"


def wheelhouse() -> Path:
    """Where built wheels are kept: IDLEGRID_WHEELHOUSE, else the XDG cache."""
    env = os.environ.get("IDLEGRID_WHEELHOUSE")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "idlegrid" / "wheels"


def variant_of(system_info: str, arch: str | None = None) -> str:
    """The CPU variant a loaded llama.cpp was compiled for, from `llama_print_system_info`.

    The names match `CPU_VARIANTS`; any feature beyond the matched level (a native build's
    VNNI, AMX, ...) is appended, so a build that computes differently never shares a class.
    """
    arch = arch or machine()
    on = {
        part.split("=")[0].strip().lower()
        for part in system_info.split("|")
        if part.strip().endswith("= 1")
    }
    if not arch.startswith("x86"):
        extras = sorted(on & {"dotprod", "matmul_int8", "sve", "sme", "fp16_va"})
        return "+".join(["arm64", *extras])
    level = "x86-64"
    if {"avx", "avx2", "fma", "f16c"} <= on:
        level = "x86-64-v3"
        if "avx512" in on:
            level = "x86-64-v4"
    base = {f.lower() for f in CPU_VARIANTS[level][0]}
    known = {f.lower() for f in _X86_OFF}
    extras = sorted((on & known) - base)
    return "+".join([level, *extras])


# ---- the build (system Python, before idlegrid is installed) ------------------------------


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    # stdout is bootstrap's answer ("installed" or "ok"); pip's chatter goes to stderr.
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)


@functools.cache
def _venv(python: str) -> tuple[Path, str]:
    """The environment's prefix and Python tag, asked once (bootstrap runs on every start)."""
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix); print(sys.implementation.cache_tag)"],
        check=True,
        capture_output=True,
        text=True,
    )
    prefix, tag = out.stdout.split()
    return Path(prefix), tag


def _python_tag(python: str) -> str:
    return _venv(python)[1]


def ensure_wheel(python: str, backend: str, variant: str) -> Path:
    """The wheel for (backend, variant), built once into the wheelhouse."""
    key = build_key(backend, variant, _python_tag(python))
    home = wheelhouse() / key
    found = sorted(home.glob("llama_cpp_python-*.whl")) if home.is_dir() else []
    if found:
        return found[-1]
    print(
        f"building llama-cpp-python {LLAMA_CPP_PYTHON} for {backend}/{variant} (about 3 "
        "minutes on 2 cores; kept in the wheelhouse under its flags)",
        file=sys.stderr,
    )
    args = cmake_args(backend, variant)
    env = {
        **os.environ,
        "CMAKE_ARGS": " ".join(args),
        "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get(
            "CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2)
        ),
    }
    env.pop("FORCE_CMAKE", None)
    with tempfile.TemporaryDirectory() as tmp:
        # --no-cache-dir: never take, nor leave, a wheel keyed by the version alone.
        _run(
            [
                python,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-cache-dir",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                "-w",
                tmp,
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            ],
            env,
        )
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if not built:
            raise BuildError("pip reported success but left no llama-cpp-python wheel")
        home.mkdir(parents=True, exist_ok=True)
        target = home / built[-1].name
        shutil.move(str(built[-1]), target)
        (home / "build.json").write_text(
            json.dumps({"cmake": args, "backend": backend, "variant": variant}, indent=1)
        )
    return target


def _venv_marker(python: str) -> Path:
    return _venv(python)[0] / MARKER


def install(python: str, backend: str, variant: str) -> bool:
    """Install the keyed wheel into `python`'s environment; False when it already was."""
    key = build_key(backend, variant, _python_tag(python))
    marker = _venv_marker(python)
    importable = (
        subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    )
    if importable and marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return False
    wheel = ensure_wheel(python, backend, variant)
    _run([python, "-m", "pip", "uninstall", "-q", "-y", "llama-cpp-python"])
    _run([python, "-m", "pip", "install", "-q", "--no-cache-dir", str(wheel)])
    marker.write_text(
        json.dumps({"key": key, "backend": backend, "variant": variant, "wheel": str(wheel)})
    )
    return True


def main(argv: list[str] | None = None) -> int:
    """`install`: build (once) and install the engine; `prove`: run it, rebuild if it crashes."""
    p = argparse.ArgumentParser(prog="llama_build", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["install", "prove", "cmake-args", "variant"])
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--backend", default=os.environ.get("IDLEGRID_LLAMA_BACKEND", "cpu"))
    p.add_argument("--variant", default=os.environ.get("IDLEGRID_LLAMA_CPU") or None)
    a = p.parse_args(argv)
    try:
        pinned = _venv_marker(a.python).parent / PINNED
        # A variant that crashed here once is not tried again (see _prove).
        variant = (
            a.variant
            or (pinned.read_text().strip() if pinned.is_file() else None)
            or default_variant()
        )
        if a.command == "cmake-args":
            print(" ".join(cmake_args(a.backend, variant)))
        elif a.command == "variant":
            print(variant)
        elif a.command == "install":
            print("installed" if install(a.python, a.backend, variant) else "ok")
        else:
            return _prove(a.python, a.backend, variant)
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _prove(python: str, backend: str, variant: str) -> int:
    """Decode a few tokens in a child; on a crash by signal rebuild once with the safe baseline."""
    from idlegrid.engines.startup import check_engine
    from idlegrid.errors import EngineCrashed

    try:
        report = check_engine("llama.cpp", "gemma3:270m")
    except EngineCrashed as first:
        safe = SAFE_VARIANT.get(machine(), variant)
        if backend != "cpu" or safe == variant:
            print(f"error: {first}", file=sys.stderr)
            return 3
        print(
            f"the {variant} engine build died with {first.data['signal']} on this machine; "
            f"rebuilding once with the safe baseline {safe}",
            file=sys.stderr,
        )
        install(python, backend, safe)
        (_venv_marker(python).parent / PINNED).write_text(safe + "\n")
        try:
            report = check_engine("llama.cpp", "gemma3:270m")
        except EngineCrashed as second:
            print(
                f"error: {second}\nThe safe {safe} build crashed too, so this is not an "
                "instruction-set mismatch: check free memory (an OOM kill shows as SIGKILL), "
                "the model file, and the compiler; the build flags are in "
                f"{wheelhouse()}/*/build.json.",
                file=sys.stderr,
            )
            return 3
    print(
        f"llama.cpp engine proven: {report['device']}, {report['decode_tps']:.1f} tok/s decode",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
