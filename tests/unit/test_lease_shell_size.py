"""The first frame of a shell names the terminal size field that is wrong."""

from __future__ import annotations

import pytest

from idlegrid.coordinator.leases import shell
from idlegrid.errors import InvalidRequest


@pytest.mark.parametrize(
    ("rows", "cols", "param"),
    [
        (0, 80, "rows"),
        (24, 0, "cols"),
        (24, "wide", "cols"),
        (True, 80, "rows"),
        (24, 1001, "cols"),
    ],
)
def test_a_bad_size_is_refused_naming_its_field(rows: object, cols: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        shell.argv_shell(rows, cols)
    assert exc.value.param == param
    assert exc.value.message.startswith(param)


def test_a_good_size_reaches_the_helper() -> None:
    assert shell.argv_shell(33, 101)[-2:] == ["33", "101"]
