"""Market commands: `idlegrid offers`, `orders`, `order`, `balance`, `explain`, `cancel`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from idlegrid.client.options import CoordinatorUrl, DataDir, JsonFlag
from idlegrid.client.output import show

out = Console()
MICRO = 1_000_000


def _client(coordinator_url: str | None, data_dir: Path) -> Any:
    from idlegrid.client.localgrid import find_grid
    from idlegrid.client.sdk import GridClient

    url, key = find_grid(coordinator_url, data_dir)
    return GridClient(url, key)


def _fail(exc: Exception) -> None:
    body = getattr(exc, "data", {}).get("body") or {}
    msg = body.get("message") or str(exc)
    param = f" (field: {body['param']})" if body.get("param") else ""
    Console(stderr=True).print(f"[red]error[/]: {msg}{param}")
    raise typer.Exit(1)


def _ask(coordinator_url: str | None, data_dir: Path, call: Any) -> Any:
    """Run `call(client)` against the grid; an API error becomes a clean message and exit 1."""
    from idlegrid.client.sdk import GridAPIError

    try:
        with _client(coordinator_url, data_dir) as c:
            return call(c)
    except GridAPIError as exc:
        _fail(exc)


def _emit(data: Any) -> None:
    out.print_json(json.dumps(data))


def offers(
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    accelerator: Annotated[str | None, typer.Option(help="Canonical model.")] = None,
    region: Annotated[str | None, typer.Option(help="Only this region.")] = None,
    model: Annotated[str | None, typer.Option(help="Only offers serving this model.")] = None,
    limit: Annotated[int, typer.Option(help="Most offers to show.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """The live offer book: devices, prices, free capacity, region, stake."""
    data = _ask(
        coordinator_url,
        data_dir,
        lambda c: c.offers(accelerator=accelerator, region=region, model=model, limit=limit),
    )
    if as_json:
        return _emit(data)
    t = Table(title=f"offers ({len(data['offers'])} of {data['total']})")
    for col in (
        "offer",
        "device",
        "free/count",
        "region",
        "cr/device-h",
        "reliability",
        "staked",
        "lease",
        "models",
    ):
        t.add_column(col)
    for o in data["offers"]:
        t.add_row(
            o["id"],
            o["device"],
            f"{o['free']}/{o['count']}",
            o["region"],
            f"{o['price_per_device_hour'] / MICRO:.4f}" if not o["plugin"] else "plug-in",
            f"{o['reliability']:.3f}",
            "yes" if o["staked"] else "[red]no[/]",
            _lease_terms(o.get("lease")),
            ", ".join(o["models"]),
        )
    show(t, out)


def _lease_terms(terms: dict[str, Any] | None) -> str:
    """One cell: the provider's lease controls for this offer (no limit: not shown)."""
    if not terms:
        return "?"
    if not terms["leases"]:
        return "not leased"
    parts = [
        f"{name.removeprefix(kind + '_')}≤{terms[name]:g}" + ("" if kind == "max" else " total")
        for kind in ("max", "total")
        for name in (f"{kind}_cpus", f"{kind}_ram_gb", f"{kind}_disk_gb")
        if terms.get(name) is not None
    ]
    parts.append("egress" if terms["egress"] else "no egress")
    if not terms["pip"]:
        parts.append("no pip")
    parts.append("/".join(terms["runtimes"]))
    return ", ".join(parts)


def orders(
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    submit: Annotated[
        Path | None, typer.Option(help="Submit the order in this JSON file ('-' for stdin).")
    ] = None,
    state: Annotated[str | None, typer.Option(help="Only orders in this state.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List your orders, or submit one (`--submit order.json`)."""
    from idlegrid.client.sdk import GridAPIError

    try:
        with _client(coordinator_url, data_dir) as c:
            if submit is not None:
                try:
                    raw = json.loads(sys.stdin.read() if str(submit) == "-" else submit.read_text())
                except (OSError, ValueError) as exc:
                    Console(stderr=True).print(f"[red]error[/]: cannot read the order: {exc}")
                    raise typer.Exit(1) from exc
                view = c.submit_order(raw)
                if as_json:
                    return _emit(view)
                _print_order(view)
                return None
            views = c.orders(state)
            batches = [b for b in c.batches(100) if state in (None, b["status"])]
    except GridAPIError as exc:
        _fail(exc)
    if as_json:
        return _emit({"orders": views, "batches": batches})
    t = Table(title="orders")
    for col in ("id", "kind", "state", "where", "budget (cr)", "spent (cr)", "refunded"):
        t.add_column(col)
    for v in views:
        where = ", ".join(leg["offer_id"] for leg in (v["placement"] or {}).get("legs", [])) or (
            f"[yellow]{(v['reasons'] or {}).get('decisive', '-')}[/]"
        )
        t.add_row(
            v["id"],
            v["kind"],
            v["state"],
            where,
            f"{v['budget'] / MICRO:.4f}",
            f"{v['spent'] / MICRO:.4f}",
            f"{v['refunded'] / MICRO:.4f}",
        )
    for b in batches:  # batch work is bought per file of requests (docs/batch.md)
        counts = b["request_counts"]
        where = f"{counts['completed']}/{counts['total']} lines done, {counts['failed']} failed"
        if b.get("waiting"):
            where += f"; [yellow]waiting: {b['waiting']['reason']}[/]"
        t.add_row(b["id"], "batch", b["status"], where, "-", "-", "-")
    show(t, out)
    return None


def _print_order(v: dict[str, Any]) -> None:
    out.print(
        f"[bold]{v['id']}[/] {v['kind']} [cyan]{v['state']}[/]  budget "
        f"{v['budget'] / MICRO:.4f} cr, spent {v['spent'] / MICRO:.4f} cr"
    )
    for leg in (v.get("placement") or {}).get("legs", []):
        out.print(
            f"  on {leg['offer_id']}: {leg['devices']} device(s) at "
            f"{leg['unit_price'] / MICRO:.4f} cr"
        )
    if v.get("reasons"):
        _print_reasons(v["reasons"])


def _print_reasons(r: dict[str, Any]) -> None:
    out.print(f"  [yellow]unmatched[/]: decided by [bold]{r['decisive']}[/]")
    for e in r["reasons"]:
        out.print(f"    {e['constraint']:<24} removed {e['eliminated']:>6}, left {e['remaining']}")


def order(
    order_id: str,
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """Show one order."""
    view = _ask(coordinator_url, data_dir, lambda c: c.order(order_id))
    if as_json:
        return _emit(view)
    _print_order(view)
    return None


def explain(
    order_id: str,
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """Why an order matched where it did, or which constraints left it unmatched (a
    batch id: how far it is, and why its lines wait if they do)."""
    if order_id.startswith("batch_"):
        return _explain_batch(_ask(coordinator_url, data_dir, lambda c: c.batch(order_id)), as_json)
    data = _ask(coordinator_url, data_dir, lambda c: c.explain(order_id))
    if as_json:
        return _emit(data)
    out.print(f"[bold]{data['order']}[/] is [cyan]{data['state']}[/]")
    if p := data.get("placement"):
        out.print(
            f"  placed on {', '.join(leg['offer_id'] for leg in p['legs'])}: cheapest "
            f"expected cost of {p['candidates']} fitting offer(s), "
            f"{p['cost'] / MICRO:.4f} cr over {p['runtime_h']:.2f} h"
            + (" (a datacenter card: no fitting consumer card was free)" if p["oversized"] else "")
        )
    if "now" in data:
        now = data["now"]
        if data.get("matches_now"):
            out.print("  [green]it would match now[/]")
        else:
            _print_reasons(now)
    return None


def _explain_batch(b: dict[str, Any], as_json: bool) -> None:
    if as_json:
        return _emit(b)
    counts = b["request_counts"]
    out.print(
        f"[bold]{b['id']}[/] is [cyan]{b['status']}[/]: {counts['completed']} of "
        f"{counts['total']} lines done, {counts['failed']} failed"
    )
    if w := b.get("waiting"):
        out.print(f"  [yellow]its lines wait for capacity[/]: {w['reason']}")
    elif b["status"] == "in_progress":
        out.print("  its lines are running on the grid")
    return None


def cancel(
    order_id: str,
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """Cancel an order: pay for service so far, get the rest of the escrow back."""
    view = _ask(coordinator_url, data_dir, lambda c: c.cancel_order(order_id))
    if as_json:
        return _emit(view)
    _print_order(view)
    return None


def balance(
    data_dir: DataDir, coordinator_url: CoordinatorUrl = None, as_json: JsonFlag = False
) -> None:
    """Your credits, and what your open orders hold in escrow."""
    bal, views = _ask(coordinator_url, data_dir, lambda c: (c.balance(), c.orders()))
    held = sum(
        v["budget"] - v["spent"] for v in views if v["state"] in ("open", "matched", "active")
    )
    data = {**bal, "in_escrow": held}
    if as_json:
        return _emit(data)
    out.print(f"balance  : {bal['balance'] / MICRO:.6f} credits")
    out.print(f"in escrow: {held / MICRO:.6f} credits ({len(views)} order(s))")
    return None


market_commands: dict[str, Any] = {
    "offers": offers,
    "orders": orders,
    "order": order,
    "explain": explain,
    "cancel": cancel,
    "balance": balance,
}
market_app = typer.Typer(no_args_is_help=True)
for _name, _fn in market_commands.items():
    if _name != "balance":  # a consumer's balance is a top-level command
        market_app.command(_name)(_fn)
