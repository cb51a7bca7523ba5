"""The llama.cpp engine that bootstrap installed: portable, named, and what it says it is."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import llama_cpp  # scripts/test always installs the llama extra
import pytest

from idlegrid.engines import llama_build as lb

AMX = re.compile(
    r"\b(tilezero|tileloaddt?1?|tilestored|tdpb[su][su]d|tdpbf16ps|tdpfp16ps|"
    r"ldtilecfg|sttilecfg|tilerelease)\b"
)


def _cpu_libraries() -> list[Path]:
    lib = Path(llama_cpp.__file__).parent / "lib"
    return sorted({p.resolve() for p in lib.glob("libggml-cpu*.so*")})


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AMX is an x86-64 extension")
def test_installed_cpu_backend_holds_no_amx_tile_instructions() -> None:
    assert shutil.which("objdump"), "binutils' objdump is needed to read the library"
    libs = _cpu_libraries()
    assert libs, "no libggml-cpu in the installed llama_cpp"
    for so in libs:
        asm = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", str(so)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert asm.count("\n") > 10_000, f"objdump read almost nothing of {so}"
        found = sorted(set(AMX.findall(asm)))
        # Never "unless the kernel offers AMX": this VM's kernel reports the tile state as
        # supported (arch_prctl ARCH_GET_XCOMP_SUPP) and a native build still dies with
        # SIGILL on its first tilezero. No variant of ours compiles AMX kernels.
        assert not found, f"{so.name} has AMX tile instructions {found}"


def test_installed_build_is_the_one_bootstrap_recorded_and_the_class_names_it() -> None:
    marker = Path(sys.prefix) / lb.MARKER
    assert marker.is_file(), "llama-cpp-python was not installed by scripts/bootstrap"
    recorded = json.loads(marker.read_text())
    assert recorded["key"].startswith(f"{lb.LLAMA_CPP_PYTHON}-{recorded['backend']}-")
    info = llama_cpp.llama_print_system_info().decode()
    assert lb.variant_of(info) == recorded["variant"]  # built exactly to the variant's flags
    assert "AMX" not in info.replace("AMX_INT8 = 0", "")


def test_engine_class_carries_the_variant() -> None:
    from idlegrid.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine("gemma3:270m", threads=1, context_length=256)
    try:
        variant = lb.variant_of(llama_cpp.llama_print_system_info().decode())
        assert eng.describe()["device"] == f"cpu-{variant}"
        assert f"/cpu-{variant}/t1" in eng.det_class()
    finally:
        eng.close()
