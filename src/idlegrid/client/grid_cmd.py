"""Commands a consumer or operator uses every day: `complete`, `status`, `ledger verify`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from idlegrid.client.dispute_cmd import dispute
from idlegrid.client.options import CoordinatorUrl, DataDir, JsonFlag
from idlegrid.client.output import show

out = Console()


def complete(
    prompt: str,
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    model: Annotated[str, typer.Option(help="Model id.")] = "gemma3:270m",
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Complete a prompt on the grid, streaming the text as it comes."""
    from idlegrid.client.sdk import GridClient

    url, key = _locate(coordinator_url, data_dir)
    with GridClient(url, key) as client:
        if as_json:
            out.print_json(
                json.dumps(
                    client.complete(
                        prompt,
                        model=model,
                        max_tokens=max_tokens,
                        temperature=temperature,
                        seed=seed,
                    )
                )
            )
            return
        for text in client.stream_complete(
            prompt, model=model, max_tokens=max_tokens, temperature=temperature, seed=seed
        ):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")


def status(
    data_dir: DataDir, coordinator_url: CoordinatorUrl = None, as_json: JsonFlag = False
) -> None:
    """Nodes, their measured speed, balances."""

    from idlegrid.client.sdk import GridClient
    from idlegrid.core.ledger import MICRO

    url, key = _locate(coordinator_url, data_dir)
    operator = _operator_key(data_dir)
    with GridClient(url, operator or key) as client:
        data = client.status()  # every balance with the operator key, public facts without
    if key:
        with GridClient(url, key) as client:
            data["me"] = client.balance()
    if as_json:
        out.print_json(json.dumps(data))
        return
    table = Table(title=f"idlegrid at {url}")
    for col in (
        "node",
        "state",
        "hardware",
        "engine",
        "prefill tok/s",
        "decode tok/s",
        "earned (cr)",
        "audit p",
        "audits ok/failed",
    ):
        table.add_column(col)
    trust = data.get("trust", {})
    for n in data["nodes"]:
        hw = n["hardware"]
        t = trust.get("nodes", {}).get(n["id"], {})
        if t.get("ejected"):
            audit = "ejected"
        elif t:
            audit = f"{t['audit_rate']:.3f}" + (" (probation)" if t["probation"] else "")
        else:
            audit = "-"
        counts = f"{t.get('passed', 0)}/{t.get('failed', 0)}" if t else "-"
        table.add_row(
            n["name"],
            ("live" if n["live"] else "gone") if n["state"] == "live" else n["state"],
            _hardware_summary(hw),
            str(n["engine"].get("engine", n["engine"].get("name", "?"))),
            f"{n['prefill_tps']:.0f}",
            f"{n['decode_tps']:.1f}",
            f"{n['earned'] / MICRO:.6f}",
            audit,
            counts,
        )
    show(table, out)
    if trust:
        out.print(
            f"audit rate: steady p = {trust['p_steady']:.4f} (2 x p* = "
            f"{trust['p_star']:.4f}); canaries {trust['canary_rate']:.3f} per audit; "
            f"beacon commitment {trust['beacon_commitment'][:16]}…"
        )
        waiting = trust.get("pending_audits") or {}
        if waiting:
            out.print(
                "audits not judged yet: "
                + ", ".join(f"{n} {k}" for k, n in sorted(waiting.items()))
            )
        for d in trust.get("disputes") or []:
            outcome = {True: "provider won", False: "provider lost"}.get(
                d["provider_right"], "open"
            )
            out.print(
                f"dispute {d['id']} over {d['audit_id']}: {d['state']}, round "
                f"{d['round']} ({outcome})"
            )
    if "me" in data:
        out.print(f"your balance: {data['me']['balance'] / MICRO:.6f} credits")
    out.print(
        f"protocol fees collected: {data['fees'] / MICRO:.6f} credits; tasks: {data['tasks']}"
    )


def verify_ledger(
    data_dir: DataDir, coordinator_url: CoordinatorUrl = None, as_json: JsonFlag = False
) -> None:
    """Recompute the ledger's hash chain and balances; exit 1 on any break."""
    from idlegrid.client.sdk import GridClient

    url, _ = _locate(coordinator_url, data_dir)
    operator = _operator_key(data_dir)
    with GridClient(url, operator) as client:
        result = client.verify_ledger()
    if as_json:
        out.print_json(json.dumps(result))
        raise typer.Exit(0 if result["ok"] else 1)
    if result["ok"]:
        out.print("[green]ledger OK[/]: chain and balances recomputed")
        return
    for p in result["problems"]:
        out.print(f"[red]{p}[/]")
    raise typer.Exit(1)


def _hardware_summary(hw: dict[str, Any]) -> str:
    gpus = hw.get("gpus") or []
    if gpus:
        return ", ".join(str(g.get("name", "GPU")) for g in gpus)
    return f"{hw.get('cpu_model') or 'CPU'}, {hw.get('cpu_logical', '?')} cores"


def _operator_key(data_dir: Path) -> str | None:
    f = data_dir / "operator-key"
    return os.environ.get("IDLEGRID_OPERATOR_KEY") or (
        f.read_text().strip() if f.exists() else None
    )


def _locate(coordinator_url: str | None, data_dir: Path) -> tuple[str, str | None]:
    from idlegrid.client.localgrid import find_grid

    return find_grid(coordinator_url, data_dir)


ledger_app = typer.Typer(no_args_is_help=True)
ledger_app.command("verify")(verify_ledger)
trust_app = typer.Typer(no_args_is_help=True)
trust_app.command("dispute")(dispute)
