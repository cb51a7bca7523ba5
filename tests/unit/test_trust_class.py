"""What the coordinator reads of a commitment's class to pick its verifier."""

from __future__ import annotations

from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import peek


def test_engine_of_a_class() -> None:
    assert cm.engine_of("llama.cpp/0.3.36/Q4_K_M/cpu/t1") == "llama.cpp"
    assert cm.engine_of("torch/2.13.0/float32/cpu/t2") == "torch"
    assert cm.engine_of("odd-class") == "odd-class"


def test_peek_class_reads_an_encoded_commitment() -> None:
    c = cm.build(
        "m",
        "llama.cpp/0.3.36/Q4_K_M/cpu/t1",
        [2, 5],
        7,
        1.0,
        1.0,
        [9, 10],
        [([0, 3, 1, 2], [4.0, -3.0, 2.0, 1.0])],
        "length",
        False,
        2,
    )
    blob = c.encode()
    assert peek.peek_class(blob) == "llama.cpp/0.3.36/Q4_K_M/cpu/t1"
    assert cm.decode(blob).header.det_class == peek.peek_class(blob)
    assert peek.peek_class(b"") == "" and peek.peek_class(b"\x05\x00\xff\xfe") == ""


def test_kernel_family_is_engine_and_device() -> None:
    v3 = "llama.cpp/0.3.36/Q4_K_M/cpu-x86-64-v3/t1"
    assert cm.kernel_family(v3) == "llama.cpp/cpu-x86-64-v3"
    # Threads, dtype and version do not split a family; the build's variant does.
    assert cm.kernel_family(v3) == cm.kernel_family("llama.cpp/0.3.35/Q2_K/cpu-x86-64-v3/t2")
    assert cm.kernel_family(v3) != cm.kernel_family("llama.cpp/0.3.36/Q4_K_M/cpu-x86-64-v4/t1")
    assert cm.kernel_family(v3) != cm.kernel_family("torch/2.13.0/float32/cpu-x86-64-v3/t1")
    assert cm.kernel_family("odd-class") == "odd-class"
