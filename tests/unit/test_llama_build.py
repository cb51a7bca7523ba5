"""The portable engine build: named variants, no native flags, keys by every flag."""

from __future__ import annotations

import pytest

from idlegrid.engines import llama_build as lb

XEON_AMX = (
    "flags\t: fpu sse sse2 avx avx2 bmi2 fma f16c avx512f avx512cd avx512vl avx512dq "
    "avx512bw avx512_vnni amx_tile amx_int8 amx_bf16\n"
)


def test_no_variant_is_native_or_uses_amx() -> None:
    for backend in lb.BACKENDS:
        for variant in lb.CPU_VARIANTS:
            args = lb.cmake_args(backend, variant)
            assert "-DGGML_NATIVE=OFF" in args
            assert not any(a.startswith("-DGGML_AMX") and a.endswith("=ON") for a in args)
            assert not any("march=native" in a for a in args)


def test_x86_variants_switch_exactly_their_features() -> None:
    v3 = lb.cmake_args("cpu", "x86-64-v3")
    assert "-DGGML_AVX2=ON" in v3 and "-DGGML_AVX512=OFF" in v3
    v4 = lb.cmake_args("cpu", "x86-64-v4")
    assert "-DGGML_AVX512=ON" in v4 and "-DGGML_AVX512_VNNI=OFF" in v4
    base = lb.cmake_args("cpu", "x86-64")
    assert "-DGGML_AVX=OFF" in base and "-DGGML_AVX2=OFF" in base
    assert "-DGGML_CUDA=ON" in lb.cmake_args("cuda", "x86-64-v3")


def test_bad_backend_or_variant_is_named() -> None:
    with pytest.raises(lb.BuildError, match="IDLEGRID_LLAMA_BACKEND"):
        lb.cmake_args("rocm", "x86-64-v3")
    with pytest.raises(lb.BuildError, match="IDLEGRID_LLAMA_CPU"):
        lb.cmake_args("cpu", "native")


def test_default_variant_follows_the_cpu_flags() -> None:
    assert lb.default_variant("x86_64", lb.cpu_flags(XEON_AMX)) == "x86-64-v3"
    assert lb.default_variant("x86_64", {"sse", "sse2", "avx"}) == "x86-64"
    assert lb.default_variant("aarch64", {"neon"}) == "arm64"
    with pytest.raises(lb.BuildError):
        lb.default_variant("riscv64", set())


def test_the_key_names_every_build_input() -> None:
    keys = {
        lb.build_key(b, v, "cpython-311")
        for b in ("cpu", "cuda")
        for v in ("x86-64", "x86-64-v3", "x86-64-v4")
    }
    assert len(keys) == 6
    assert lb.build_key("cpu", "x86-64-v3", "cpython-311") != lb.build_key(
        "cpu", "x86-64-v3", "cpython-312"
    )
    assert lb.build_key("cpu", "x86-64-v3", "x") == lb.build_key("cpu", "x86-64-v3", "x")


def test_wheelhouse_is_ours_not_pips(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("IDLEGRID_WHEELHOUSE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lb.wheelhouse() == tmp_path / "idlegrid" / "wheels"
    monkeypatch.setenv("IDLEGRID_WHEELHOUSE", str(tmp_path / "w"))
    assert lb.wheelhouse() == tmp_path / "w"


@pytest.mark.parametrize(
    "info,variant",
    [
        (
            "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
            "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |",
            "x86-64-v3",
        ),
        (
            "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
            "REPACK = 1 |",
            "x86-64-v4",
        ),
        (
            "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
            "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1 |",
            "x86-64-v4+amx_int8+avx512_vbmi+avx512_vnni",
        ),
        ("CPU : SSE3 = 1 | SSSE3 = 1 | LLAMAFILE = 1 |", "x86-64"),
    ],
)
def test_variant_of_names_what_the_library_was_built_for(info: str, variant: str) -> None:
    assert lb.variant_of(info, "x86_64") == variant


def test_variant_of_arm() -> None:
    info = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | REPACK = 1 |"
    assert lb.variant_of(info, "aarch64") == "arm64+dotprod+fp16_va"
