"""The batch's pure core: every move of its lifecycle, its request counts, its input rules."""

from __future__ import annotations

import itertools
import json

import pytest

from idlegrid.core.batch.counts import RequestCounts
from idlegrid.core.batch.input import ENDPOINTS, check_endpoint, check_input, numbered
from idlegrid.core.batch.lifecycle import BATCH, STAMPS, BatchState, cancel
from idlegrid.errors import IllegalTransition

S = BatchState
LEGAL = {
    (S.VALIDATING, S.IN_PROGRESS),
    (S.VALIDATING, S.FAILED),
    (S.VALIDATING, S.CANCELLING),
    (S.IN_PROGRESS, S.FINALIZING),
    (S.IN_PROGRESS, S.EXPIRED),
    (S.IN_PROGRESS, S.CANCELLING),
    (S.FINALIZING, S.COMPLETED),
    (S.CANCELLING, S.CANCELLED),
}


@pytest.mark.parametrize(("start", "finish"), list(itertools.product(S, S)))
def test_every_move_is_legal_exactly_when_listed(start: S, finish: S) -> None:
    if (start, finish) in LEGAL:
        assert BATCH.move(start, finish, key="batch_1") == finish.value
    else:
        with pytest.raises(IllegalTransition) as info:
            BATCH.move(start, finish, key="batch_1")
        assert (info.value.src, info.value.dst, info.value.key) == (start, finish, "batch_1")


def test_states_terminal_initial_and_stamps() -> None:
    assert BATCH.terminal == {"completed", "failed", "expired", "cancelled"}
    assert BATCH.begin("validating") == "validating"
    with pytest.raises(IllegalTransition):
        BATCH.begin("in_progress")
    assert set(STAMPS) == {s.value for s in S}
    assert STAMPS["cancelling"] == "cancelling_at" and STAMPS["validating"] == "created_at"
    assert BATCH.sources("cancelling") == ("in_progress", "validating")


def test_cancel_is_refused_once_finalizing_or_ended() -> None:
    assert cancel("validating") == "cancelling"
    assert cancel("in_progress") == "cancelling"
    for state in ("finalizing", "completed", "failed", "expired", "cancelling", "cancelled"):
        with pytest.raises(IllegalTransition):
            cancel(state, key="b")


def test_request_counts() -> None:
    c = RequestCounts(3)
    assert (c.remaining, c.done) == (3, False)
    c = c.record(True).record(False)
    assert c.as_dict() == {"total": 3, "completed": 1, "failed": 1}
    assert c.close().as_dict() == {"total": 3, "completed": 1, "failed": 2}
    assert c.close().done and c.close().close() == c.close()
    with pytest.raises(ValueError):
        c.record(True, 2)
    with pytest.raises(ValueError):
        RequestCounts(1, 1, 1)
    with pytest.raises(ValueError):
        RequestCounts(-1)


def _line(**over: object) -> str:
    base: dict[str, object] = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": []},
    }
    base.update(over)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def test_valid_input_keeps_every_line_with_its_number() -> None:
    text = _line(custom_id="a") + "\n\n" + _line(custom_id="b") + "\n"
    checked = check_input(numbered(text.split("\n")), "/v1/chat/completions")
    assert checked.ok and checked.errors_object() == {"object": "list", "data": []}
    assert [(x.line, x.custom_id, x.url) for x in checked.lines] == [
        (1, "a", "/v1/chat/completions"),
        (3, "b", "/v1/chat/completions"),
    ]


@pytest.mark.parametrize(
    ("line", "code", "param"),
    [
        ("not json", "invalid_json_line", None),
        ("[1, 2]", "invalid_json_line", None),
        (_line(custom_id=...), "missing_required_parameter", "custom_id"),
        (_line(method=...), "missing_required_parameter", "method"),
        (_line(url=...), "missing_required_parameter", "url"),
        (_line(body=...), "missing_required_parameter", "body"),
        (_line(extra=1), "unknown_parameter", "extra"),
        (_line(custom_id=7), "invalid_value", "custom_id"),
        (_line(custom_id=""), "invalid_value", "custom_id"),
        (_line(custom_id="x" * 513), "invalid_value", "custom_id"),
        (_line(method="GET"), "invalid_value", "method"),
        (_line(url="/v1/images/generations"), "invalid_url", "url"),
        (_line(url="/v1/completions"), "mismatched_endpoint", "url"),
        (_line(body=[1]), "invalid_value", "body"),
        (_line(custom_id="first"), "duplicate_custom_id", "custom_id"),
    ],
)
def test_each_rule_names_its_code_param_and_line(line: str, code: str, param: str | None) -> None:
    text = [_line(custom_id="first"), "", line]
    checked = check_input(numbered(text), "/v1/chat/completions")
    assert not checked.ok and [x.custom_id for x in checked.lines] == ["first"]
    (err,) = checked.errors_object()["data"]
    assert (err["code"], err["param"], err["line"]) == (code, param, 3)
    assert err["message"]


def test_bytes_lines_and_the_error_cap() -> None:
    lines = [(n, b"\xff") for n in range(1, 6)]
    checked = check_input(lines, "/v1/embeddings", max_errors=2)
    assert checked.error_count == 5 and [e.line for e in checked.errors] == [1, 2]
    assert checked.errors[0].code == "invalid_json_line"
    ok = check_input([(1, ("\ufeff" + _line(url="/v1/embeddings")).encode())], "/v1/embeddings")
    assert ok.ok and ok.lines[0].body == {"model": "m", "messages": []}


def test_endpoints() -> None:
    assert all(check_endpoint(e) == e for e in ENDPOINTS)
    with pytest.raises(ValueError, match="/v1/responses"):
        check_endpoint("/v1/responses")
