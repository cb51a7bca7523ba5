"""The Files API's pure rules: purposes, and the JSONL scan with its limits."""

from __future__ import annotations

import pytest

from idlegrid.core.files import JsonlScan, Limits, check_purpose
from idlegrid.errors import InvalidRequest

LIMITS = Limits(max_bytes=1000, max_lines=3, max_line_bytes=40)


def scan(*chunks: bytes, limits: Limits = LIMITS) -> int:
    s = JsonlScan(limits)
    for c in chunks:
        s.feed(c)
    return s.end()


def refusal(*chunks: bytes, limits: Limits = LIMITS) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        scan(*chunks, limits=limits)
    return info.value


def test_purposes() -> None:
    assert check_purpose("batch") == "batch"
    for bad in ("batch_output", "fine-tune", "assistants", ""):
        with pytest.raises(InvalidRequest) as info:
            check_purpose(bad)
        assert info.value.param == "purpose"


def test_lines_split_across_chunks_blank_lines_and_no_final_newline() -> None:
    assert scan(b'{"a"', b": 1}\n\n  \n", b'{"b": 2}\r\n{}') == 3
    assert scan(b'\xef\xbb\xbf{"bom": 1}\n') == 1


@pytest.mark.parametrize(
    ("chunks", "line", "limit", "words"),
    [
        ((b'{"a": 1}\n', b"nope\n"), 2, None, "not valid JSON"),
        ((b'{"a": 1}\n[1]\n',), 2, None, "not a JSON object"),
        ((b'{"a": "\xff"}\n',), 1, None, "not UTF-8"),
        ((b"{}\n" * 4,), None, "files_max_lines", "3 lines"),
        ((b'{"a": "' + b"x" * 20, b"x" * 20 + b'"}\n'), 1, "files_max_line_bytes", "40 bytes"),
        ((b"{}\n" * 2, b" " * 1000), None, "files_max_bytes", "1000 bytes"),
        ((b"\n\n",), None, None, "no JSON lines"),
    ],
)
def test_refusals_name_the_line_and_the_limit(
    chunks: tuple[bytes, ...], line: int | None, limit: str | None, words: str
) -> None:
    exc = refusal(*chunks)
    assert exc.param == "file" and words in exc.message
    assert exc.data.get("line") == line and exc.data.get("limit") == limit
