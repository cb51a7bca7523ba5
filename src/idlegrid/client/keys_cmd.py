"""`idlegrid keys create|list|revoke|fund`: consumer API keys, for the operator.

Every call needs the operator key (IDLEGRID_OPERATOR_KEY, or `operator-key` in the grid's
data directory); the routes are /api/v1/admin/keys and /api/v1/admin/mint.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from idlegrid.client.options import CoordinatorUrl, DataDir, JsonFlag
from idlegrid.client.output import show

keys_app = typer.Typer(no_args_is_help=True)
out = Console(soft_wrap=True)
MICRO = 1_000_000


def _operator(coordinator_url: str | None, data_dir: Path) -> Any:
    import os

    from idlegrid.client.localgrid import find_grid
    from idlegrid.client.sdk import GridClient
    from idlegrid.config import OPERATOR_KEY_FILE

    url, _ = find_grid(coordinator_url, data_dir)
    f = data_dir / OPERATOR_KEY_FILE
    key = os.environ.get("IDLEGRID_OPERATOR_KEY") or (f.read_text().strip() if f.exists() else None)
    return GridClient(url, key)


def _credits(micro: int | None) -> str:
    return "—" if micro is None else f"{micro / MICRO:,.6f}"


SpendCap = Annotated[
    float | None,
    typer.Option(min=0, help="Most credits the key may ever spend (default: its balance only)."),
]


@keys_app.command()
def create(
    name: Annotated[str, typer.Argument(help="Who or what the key is for.")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    credits: Annotated[float, typer.Option(min=0, help="Credits to fund it with.")] = 0.0,
    spend_cap: SpendCap = None,
    rpm: Annotated[
        int | None, typer.Option("--rpm", min=1, help="Requests per minute (default: no limit).")
    ] = None,
    tpm: Annotated[
        int | None,
        typer.Option("--tpm", min=1, help="Tokens (prompt + most output) per minute."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a consumer API key; its secret is printed once, never stored."""
    body: dict[str, Any] = {"name": name}
    if spend_cap is not None:
        body["spend_cap"] = round(spend_cap * MICRO)
    if rpm is not None:
        body["rpm"] = rpm
    if tpm is not None:
        body["tpm"] = tpm
    with _operator(coordinator_url, data_dir) as c:
        made = c.create_key(body)
        if credits:
            made["balance"] = c.mint(
                key_id=made["key_id"], amount=round(credits * MICRO), reference=_ref(made)
            )["balance"]
    if as_json:
        out.print_json(json.dumps(made))
        return
    out.print(f"key id : {made['key_id']}")
    out.print(f"api key: {made['api_key']}  (shown once: give it to the consumer now)")
    if credits:
        out.print(f"balance: {_credits(made['balance'])} credits")


def _ref(made: dict[str, Any]) -> str:
    return f"keys-create:{made['key_id']}"


@keys_app.command("list")
def list_keys(
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    all_keys: Annotated[bool, typer.Option("--all", help="Revoked keys too.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Keys with their balance, spend, limits and state."""
    with _operator(coordinator_url, data_dir) as c:
        keys = c.keys()
    if not all_keys:
        keys = [k for k in keys if k["revoked_at"] is None]
    if as_json:
        out.print_json(json.dumps({"keys": keys}))
        return
    t = Table(title=f"API keys ({len(keys)})")
    for col in ("key id", "name", "state", "balance cr", "spent cr", "spend cap cr", "rpm", "tpm"):
        t.add_column(col, justify="right" if col.endswith(("cr", "pm")) else "left")
    for k in keys:
        t.add_row(
            k["key_id"],
            k["name"],
            "revoked" if k["revoked_at"] is not None else "active",
            _credits(k["balance"]),
            _credits(k["spent"]),
            _credits(k.get("spend_cap")),
            str(k.get("rpm") or "—"),
            str(k.get("tpm") or "—"),
        )
    show(t, out)


@keys_app.command()
def limit(
    key_id: Annotated[str, typer.Argument(help="The key id (key_…).")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    spend_cap: SpendCap = None,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute.")] = None,
    lift: Annotated[
        list[str] | None,
        typer.Option("--lift", help="Remove a limit: spend-cap, rpm or tpm (repeatable)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Change a key's spend cap or rate limits; limits not named stay as they are."""
    body: dict[str, int | None] = {}
    for name in lift or []:
        field = name.replace("-", "_")
        if field not in ("spend_cap", "rpm", "tpm"):
            raise typer.BadParameter("one of spend-cap, rpm, tpm", param_hint="--lift")
        body[field] = None
    if spend_cap is not None:
        body["spend_cap"] = round(spend_cap * MICRO)
    if rpm is not None:
        body["rpm"] = rpm
    if tpm is not None:
        body["tpm"] = tpm
    if not body:
        raise typer.BadParameter("name a limit to set or --lift", param_hint="--rpm")
    with _operator(coordinator_url, data_dir) as c:
        k = c.set_key_limits(key_id, body)
    if as_json:
        out.print_json(json.dumps(k))
        return
    out.print(
        f"{key_id}: spend cap {_credits(k['spend_cap'])} cr, rpm {k['rpm'] or '—'}, "
        f"tpm {k['tpm'] or '—'}"
    )


@keys_app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (key_…), not the secret.")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """Revoke a key: its requests are refused from now on; its balance stays."""
    with _operator(coordinator_url, data_dir) as c:
        r = c.revoke_key(key_id)
    if as_json:
        out.print_json(json.dumps({"key_id": key_id, **r}))
        return
    out.print(f"{key_id} revoked" if r["changed"] else f"{key_id} was already revoked")


@keys_app.command()
def fund(
    key_id: Annotated[str, typer.Argument(help="The key id (key_…).")],
    credits: Annotated[float, typer.Argument(help="Credits to add.")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Idempotency reference (a payment id): replaying it credits once."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Credit a key with new credits (a deposit, named in the ledger by its reference)."""
    if credits <= 0:
        raise typer.BadParameter("give a positive amount", param_hint="CREDITS")
    ref = reference or f"keys-fund:{key_id}:{int(time.time())}:{secrets.token_hex(4)}"
    with _operator(coordinator_url, data_dir) as c:
        r = c.mint(key_id=key_id, amount=round(credits * MICRO), reference=ref)
    if as_json:
        out.print_json(json.dumps({"key_id": key_id, "reference": ref, **r}))
        return
    note = "" if r["created"] else " (reference seen before: nothing added)"
    out.print(f"{key_id}: balance {_credits(r['balance'])} credits{note}")
