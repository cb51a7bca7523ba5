"""`idlegrid provide --link NODE=GBPS[@MS]`: the links a provider reports for training gangs."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from idlegrid.client.cli import app
from idlegrid.client.provide_opts import parse_links


def test_links_and_latency_are_parsed_per_peer() -> None:
    assert parse_links([]) == ({}, {})
    assert parse_links(["aa=10", "bb=1.5@20"]) == ({"aa": 10.0, "bb": 1.5}, {"bb": 20.0})


@pytest.mark.parametrize(
    "bad", ["aa", "=10", "aa=", "aa=0", "aa=-1", "aa=fast", "aa=1@-5", "aa=1@x"]
)
def test_a_bad_link_is_refused_naming_the_option(bad: str) -> None:
    with pytest.raises(typer.BadParameter) as exc:
        parse_links([bad])
    assert exc.value.param_hint == "--link" and repr(bad) in exc.value.message


def test_provide_offers_the_option() -> None:
    res = CliRunner().invoke(app, ["provide", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--link" in res.stdout


def test_provide_refuses_a_bad_link_before_loading_anything() -> None:
    res = CliRunner().invoke(
        app, ["provide", "--link", "aa=fast", "--coordinator", "http://127.0.0.1:9"]
    )
    assert res.exit_code == 2 and "--link" in res.output, res.output
