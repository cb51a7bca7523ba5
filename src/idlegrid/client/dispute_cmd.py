"""`idlegrid dispute`: a provider contests a failed audit of its answer or segment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from idlegrid.config import DEFAULT_PORT, default_data_dir

out = Console()

# Audit ids tell their kind: trust audits are `aud-…`, training audits `taud-…`.
AUDIT_PREFIXES = {"aud-": "inference", "taud-": "training"}


def audit_kind(audit_id: str, kind: str | None) -> str:
    """The dispute kind: as given, else from the audit id's prefix (exit 1 if neither)."""
    if kind is not None:
        return kind
    for prefix, k in AUDIT_PREFIXES.items():
        if audit_id.startswith(prefix):
            return k
    out.print(
        f"cannot tell the kind of audit {audit_id!r} from its id: "
        "pass --kind inference or --kind training"
    )
    raise typer.Exit(1)


def dispute(
    audit_id: Annotated[
        str,
        typer.Argument(
            help="The failed audit of one of your answers (aud-…) or segments (taud-…)."
        ),
    ],
    kind: Annotated[
        str | None, typer.Option(help="inference or training; by default told from the audit id.")
    ] = None,
    coordinator_url: Annotated[str, typer.Option("--coordinator", help="Coordinator URL.")] = (
        f"http://127.0.0.1:{DEFAULT_PORT}"
    ),
    name: Annotated[str | None, typer.Option(help="The provider's name (its key file).")] = None,
    key_file: Annotated[Path | None, typer.Option(help="The provider's node key.")] = None,
    reason: Annotated[str, typer.Option(help="Why the audit was wrong.")] = "",
) -> None:
    """Contest a failed audit, of an answer or of a training segment, as the provider (signed
    with its node key); prints the dispute. Its rounds are answered by the running agent;
    `idlegrid status` (inference) or `idlegrid train show ID` (training) shows the ruling."""
    body = {"kind": audit_kind(audit_id, kind), "audit_id": audit_id, "reason": reason}
    _signed_dispute(body, coordinator_url, name, key_file)


def _signed_dispute(
    body: dict[str, Any], coordinator_url: str, name: str | None, key_file: Path | None
) -> None:
    import asyncio
    import socket

    import httpx

    from idlegrid.agent.node_client import NodeClient
    from idlegrid.errors import IdlegridError
    from idlegrid.protocol.signing import NodeKey

    key_path = key_file or default_data_dir() / "nodes" / f"{name or socket.gethostname()}.key"
    if not key_path.exists():
        out.print(f"no node key at {key_path}: only the provider that did the work can dispute")
        raise typer.Exit(1)

    async def send() -> Any:
        client = NodeClient(coordinator_url, NodeKey.load_or_create(key_path))
        try:
            return await client.call("/api/v1/disputes", body)
        finally:
            await client.close()

    try:
        answer = asyncio.run(send())
    except IdlegridError as exc:
        out.print(f"refused: {exc.message}")
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        out.print(f"coordinator not reachable at {coordinator_url}: {exc}")
        raise typer.Exit(1) from exc
    out.print_json(json.dumps(answer))
