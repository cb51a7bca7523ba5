"""Provider lease controls, pure: parsing, the one rule (`refusal`) the agent applies and
the auction's named filters that follow it, the order fields a lease adds, the egress
rules and the argv/venv that egress changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from idlegrid.agent.workspace import egress
from idlegrid.agent.workspace import sandbox as sb
from idlegrid.agent.workspace.base import WorkspaceSpec
from idlegrid.agent.workspace.pyenv import venv_script
from idlegrid.core.lease.controls import LeaseAsk, LeaseControls, parse_controls, refusal
from idlegrid.core.lease.spec import workspace_spec
from idlegrid.core.ledger import MICRO
from idlegrid.core.market.auction import Book, Placement, Unmatched, lease_of
from idlegrid.core.market.hardware import Device, Hardware
from idlegrid.core.market.offers import Offer
from idlegrid.core.market.orders import Order, parse_order
from idlegrid.errors import InvalidRequest


def test_controls_parse_and_round_trip_and_default_to_no_egress() -> None:
    assert LeaseControls().egress is False and LeaseControls().runtimes == ("bwrap",)
    c = parse_controls({"devices": ["RTX-4090"], "max_cpus": 4, "total_ram_gb": 64, "egress": True})
    assert c.leases("RTX-4090") and not c.leases("CPU")
    assert parse_controls(c.to_dict()) == c
    assert parse_controls({"devices": "none"}).leases("CPU") is False
    assert parse_controls({"devices": "all"}).leases("CPU") is True


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"runtimes": ["local"]}, "lease.runtimes"),
        ({"max_cpus": -1}, "lease.max_cpus"),
        ({"max_ram_gb": True}, "lease.max_ram_gb"),
        ({"egress": "yes"}, "lease.egress"),
        ({"devices": 3}, "lease.devices"),
        ({"max_gpus": 1}, "lease.max_gpus"),
    ],
)
def test_bad_controls_name_the_field(raw: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_controls(raw)
    assert e.value.data["param"] == param


def test_refusal_names_the_first_control_exceeded() -> None:
    c = LeaseControls(max_cpus=2, total_cpus=3, max_disk_gb=10, pip=False)
    assert refusal(c, LeaseAsk(cpus=2)) is None

    def stop(ask: LeaseAsk, used: tuple[float, float, float] = (0, 0, 0)) -> str | None:
        why = refusal(c, ask, used)
        return None if why is None else why[0]

    assert stop(LeaseAsk(cpus=3)) == "lease.max_cpus"
    assert stop(LeaseAsk(cpus=2), used=(2, 0, 0)) == "lease.total_cpus"
    assert stop(LeaseAsk(disk_gb=11)) == "lease.max_disk_gb"
    assert stop(LeaseAsk(egress=True)) == "lease.egress"
    assert stop(LeaseAsk(pip=True)) == "lease.pip"
    assert stop(LeaseAsk(runtime="podman")) == "lease.runtime"
    assert refusal(LeaseControls(devices=frozenset()), LeaseAsk(), model="CPU") is not None


def _book(*controls: LeaseControls) -> Book:
    offers = []
    for i, c in enumerate(controls):
        hw = Hardware(f"p{i}", "local", (Device("CPU", 2),), cpus=16, ram_gb=64)
        offers.append(Offer(f"p{i}/CPU", hw, hw.devices[0], MICRO, lease=c))
    return Book(offers)


def _lease(oid: str, **resources: object) -> Order:
    return parse_order(
        {"id": oid, "kind": "lease", "hours": 1, "resources": {"max_price": 5, **resources}}
    )


def test_the_auction_places_a_lease_only_where_every_control_allows_it() -> None:
    book = _book(LeaseControls(max_cpus=2), LeaseControls(max_cpus=8, total_cpus=10))
    order = _lease("a", cpus=4, disk_gb=20)
    placed = book.match(order)
    assert isinstance(placed, Placement) and placed.providers == ["p1"]
    book.take(placed, lease_of(order))
    assert list(book.leased[1]) == [4, 2, 20]
    # 4 + 8 > 10 cores in total: the second big ask waits, and says why.
    big = _lease("b", cpus=8)
    why = book.match(big)
    assert isinstance(why, Unmatched) and why.decisive == "lease.total_cpus"
    book.release(placed, lease_of(order))
    assert isinstance(book.match(big), Placement)
    stopped = book.match(_lease("c", egress=True))
    assert isinstance(stopped, Unmatched) and stopped.decisive == "lease.egress"


def test_other_kinds_ignore_lease_controls() -> None:
    book = _book(LeaseControls(devices=frozenset()))
    order = parse_order({"id": "t", "kind": "training", "hours": 1, "resources": {"max_price": 5}})
    assert isinstance(book.match(order), Placement)


@pytest.mark.parametrize(
    ("resources", "param"),
    [
        ({"disk_gb": "x"}, "resources.disk_gb"),
        ({"pip": ["--index-url=http://evil"]}, "resources.pip"),
        ({"pip": ["a b"]}, "resources.pip"),
        ({"pip": "x" * 200}, "resources.pip"),
        ({"egress": 1}, "resources.egress"),
        ({"runtime": "local"}, "resources.runtime"),
    ],
)
def test_bad_lease_fields_name_themselves(resources: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        _lease("x", **resources)
    assert e.value.data["param"] == param


def test_lease_fields_round_trip_and_reach_the_workspace_spec() -> None:
    order = _lease("x", disk_gb=20, pip="torch, numpy>=1.26", egress=True, runtime="bwrap")
    assert order.spec.pip == ("torch", "numpy>=1.26")
    body = order.to_dict()
    assert _lease("x", **body["resources"]).spec == order.spec
    spec = workspace_spec(body["resources"])
    assert spec["disk_bytes"] == 20 << 30 and spec["pip"] == ["torch", "numpy>=1.26"]
    assert spec["egress"] is True and spec["runtime"] == "bwrap"
    assert "egress" not in workspace_spec({})  # older agents forbid the field: only when asked


def test_egress_rules_reject_the_provider_and_let_only_dns_through() -> None:
    rules = egress.rules(["192.0.2.2"])
    rejected = {r[3] for r in rules if "REJECT" in r}
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= rejected
    assert {"127.0.0.0/8", "100.64.0.0/10", "192.0.2.2/32"} <= rejected
    accepts = [r for r in rules if r[-1] == "ACCEPT"]
    assert [r[3] for r in accepts] == ["lo", egress.DNS, egress.DNS]
    first_reject = min(i for i, r in enumerate(rules) if "REJECT" in r)
    assert all(rules.index(r) < first_reject for r in accepts)


def test_egress_binds_the_nats_resolver_and_needs_the_leases_namespace(tmp_path: Path) -> None:
    host = sb.Host({"/usr": ""}, frozenset(), Path("/usr"), "3.11", None, tmp_path)
    common = {"uid": 1, "procs": [], "work": Path("/w"), "wheels": None, "argv": ["true"]}
    argv = sb.command(
        host, WorkspaceSpec("L", egress=True), netns=tmp_path / "net", env={}, cwd="/work",
        **common,
    )  # fmt: skip
    i = argv.index("/etc/resolv.conf")
    assert argv[i - 2 : i] == ["--ro-bind", str(tmp_path / "resolv.conf")]
    plain = sb.command(
        host, WorkspaceSpec("L"), netns=tmp_path / "net", env={}, cwd="/work",
        **common,
    )  # fmt: skip
    assert "/etc/resolv.conf" not in plain
    with pytest.raises(ValueError, match="namespace"):
        sb.command(host, WorkspaceSpec("L", egress=True), env={}, cwd="/work", **common)


def test_pip_without_a_wheelhouse_uses_the_index_only_with_egress() -> None:
    s = venv_script("py", "3.11", None, "/work/.venv", ("a==1",), None, index=True)
    assert "--no-index" not in s and "-- a==1" in s
    with pytest.raises(ValueError, match="wheelhouse"):
        venv_script("py", "3.11", None, "/work/.venv", ("a",), None)


def test_provide_flags_make_the_controls_and_a_bad_one_names_itself() -> None:
    import typer

    from idlegrid.client.provide_opts import lease_controls

    c = lease_controls("RTX-4090,CPU", "cpus=4,ram_gb=16", "disk_gb=100", True, False, "bwrap")
    assert c == LeaseControls(
        devices=frozenset({"RTX-4090", "CPU"}), max_cpus=4, max_ram_gb=16, total_disk_gb=100,
        egress=True, pip=False,
    )  # fmt: skip
    assert lease_controls("all", None, None, False, True, "bwrap") == LeaseControls()
    with pytest.raises(typer.BadParameter, match="gpus"):
        lease_controls("all", "gpus=2", None, False, True, "bwrap")
    with pytest.raises(typer.BadParameter, match="lease.runtimes"):
        lease_controls("all", None, None, False, True, "local")


def test_provide_refuses_bad_lease_flags_before_loading_anything() -> None:
    from typer.testing import CliRunner

    from idlegrid.client.cli import app

    runner = CliRunner()
    wide = {"COLUMNS": "300"}  # the error box must not wrap the names asserted on
    bad = runner.invoke(app, ["provide", "--lease-max", "gpus=2", "--no-startup-check"], env=wide)
    assert bad.exit_code == 2 and "gpus" in bad.output, bad.output
    env = {**wide, "IDLEGRID_LEASE_RUNTIMES": "local"}
    bad = runner.invoke(app, ["provide", "--no-startup-check"], env=env)
    assert bad.exit_code == 2 and "lease.runtimes" in bad.output, bad.output


def test_an_order_may_name_an_image_which_implies_podman_and_reaches_the_workspace() -> None:
    from idlegrid.core.market.spec import parse_spec

    for ref in ("busybox", "localhost/idlegrid-test:tiny", "ghcr.io:443/a/b-c_d:v1.2",
                "x/y@sha256:" + "a" * 64):  # fmt: skip
        spec = parse_spec({"image": ref})
        assert (spec.image, spec.runtime) == (ref, "podman")
        assert parse_spec(spec.to_dict()) == spec
        ws = workspace_spec({"image": ref})
        assert (ws["image"], ws["runtime"]) == (ref, "podman")
    assert "image" not in workspace_spec({}) and "runtime" not in workspace_spec({})
    for bad in ("", "Upper/Case", "a b", "--privileged", "x" * 256, 7, "a:b:c"):
        with pytest.raises(InvalidRequest) as err:
            parse_spec({"image": bad})
        assert err.value.param == "resources.image"
    with pytest.raises(InvalidRequest, match="podman"):
        parse_spec({"image": "busybox", "runtime": "bwrap"})


def test_the_provision_frame_refuses_an_image_that_is_not_a_reference() -> None:
    from pydantic import ValidationError

    from idlegrid.protocol.lease import LeaseSpecMsg

    base = {"cpus": 1, "memory_bytes": 1 << 30, "pids": 64, "disk_bytes": 1 << 30}
    assert LeaseSpecMsg(**base, image="localhost/x:1").image == "localhost/x:1"
    for bad in ("--privileged", "a b", "Upper"):  # it becomes an argument of podman
        with pytest.raises(ValidationError):
            LeaseSpecMsg(**base, image=bad)
