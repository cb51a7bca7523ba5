"""A step's rows split into llama.cpp's ubatches of consecutive sequence ids."""

from __future__ import annotations

import pytest

pytest.importorskip("numpy")

from idlegrid.engines.batched import _shapes  # noqa: E402


def test_consecutive_slots_are_one_ubatch() -> None:
    assert _shapes([2, 3, 4]) == [(3, 0), (3, 1), (3, 2)]


def test_a_hole_starts_a_new_ubatch() -> None:
    assert _shapes([0, 2, 3, 4, 5]) == [(1, 0), (4, 0), (4, 1), (4, 2), (4, 3)]
    assert _shapes([0, 3]) == [(1, 0), (1, 0)]
    assert _shapes([]) == []
