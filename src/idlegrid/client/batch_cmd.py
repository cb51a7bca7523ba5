"""`idlegrid batch submit | list | status | results | cancel`: OpenAI's Batch API on the grid
(docs/batch.md), each with `--json`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from idlegrid.client.options import CoordinatorUrl, DataDir, JsonFlag
from idlegrid.client.output import show

out = Console()
err = Console(stderr=True, soft_wrap=True)  # an error is one line, however narrow
batch_app = typer.Typer(help="Batches: a JSONL file of requests in, a file of answers out.")
ENDED = ("completed", "failed", "expired", "cancelled")


def _call(coordinator_url: str | None, data_dir: Path, fn: Any) -> Any:
    """Run `fn(client)` against the grid; an API error is a clean message and exit 1."""
    from idlegrid.client.localgrid import find_grid
    from idlegrid.client.sdk import GridAPIError, GridClient

    url, key = find_grid(coordinator_url, data_dir)
    try:
        with GridClient(url, key) as c:
            return fn(c)
    except GridAPIError as exc:
        body = exc.data.get("body") or {}
        param = f" (field: {body['param']})" if body.get("param") else ""
        err.print(f"[red]error[/]: {body.get('message') or exc.message}{param}")
        raise typer.Exit(1) from None


def _emit(data: Any) -> None:
    out.print_json(json.dumps(data))


def _counts(b: dict[str, Any]) -> str:
    c = b["request_counts"]
    return f"{c['completed']}/{c['total']} done, {c['failed']} failed"


def _wait(c: Any, batch: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Poll until the batch ends, with a progress bar (counts and ETA) on a terminal."""
    from idlegrid.client.progress import make_progress

    with make_progress(err, quiet=quiet) as progress:
        task = progress.add_task(batch["id"], total=batch["request_counts"]["total"], rate="")
        while batch["status"] not in ENDED:
            time.sleep(0.5)  # a poll interval, not synchronisation
            batch = c._json(c.http.get(f"/v1/batches/{batch['id']}"))
            counts = batch["request_counts"]
            progress.update(
                task,
                completed=counts["completed"] + counts["failed"],
                rate=f"{counts['failed']} failed",
            )
    return batch


@batch_app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Input JSONL.")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    endpoint: Annotated[str, typer.Option(help="The lines' endpoint.")] = "/v1/chat/completions",
    window: Annotated[str, typer.Option("--completion-window", help="Time to finish.")] = "24h",
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it ends.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Upload FILE and start a batch of its lines."""

    def go(c: Any) -> dict[str, Any]:
        with file.open("rb") as f:
            uploaded = c._json(
                c.http.post(
                    "/v1/files",
                    files={"file": (file.name, f, "application/jsonl")},
                    data={"purpose": "batch"},
                )
            )
        body = {
            "input_file_id": uploaded["id"],
            "endpoint": endpoint,
            "completion_window": window,
        }
        batch: dict[str, Any] = c._json(c.http.post("/v1/batches", json=body))
        return _wait(c, batch, as_json) if wait else batch

    batch = _call(coordinator_url, data_dir, go)
    if as_json:
        return _emit(batch)
    out.print(f"{batch['id']}: {batch['status']} ({_counts(batch)})")
    if batch["status"] == "failed" and batch.get("errors"):
        for e in batch["errors"]["data"]:
            out.print(f"  line {e['line']}: {e['code']}: {e['message']}")
        raise typer.Exit(1)


@batch_app.command("list")
def list_batches(
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    limit: Annotated[int, typer.Option(help="Most batches to show.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """Your batches, newest first."""
    page = _call(
        coordinator_url, data_dir, lambda c: c._json(c.http.get(f"/v1/batches?limit={limit}"))
    )
    if as_json:
        return _emit(page)
    t = Table(title="batches")
    for col in ("id", "status", "endpoint", "requests", "created"):
        t.add_column(col)
    for b in page["data"]:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(b["created_at"]))
        t.add_row(b["id"], b["status"], b["endpoint"], _counts(b), created)
    show(t, out)


@batch_app.command("status")
def status(
    batch_id: str,
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """One batch: its state, counts and files."""
    b = _call(coordinator_url, data_dir, lambda c: c._json(c.http.get(f"/v1/batches/{batch_id}")))
    if as_json:
        return _emit(b)
    out.print(f"{b['id']}: {b['status']} ({_counts(b)})")
    if b.get("waiting"):
        out.print(f"  waiting for capacity: {b['waiting']['reason']}")
    for name in ("input_file_id", "output_file_id", "error_file_id"):
        if b.get(name):
            out.print(f"  {name}: {b[name]}")


@batch_app.command("results")
def results(
    batch_id: str,
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write here.")] = None,
    errors: Annotated[bool, typer.Option("--errors", help="The error file instead.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """The output (or error) file of an ended batch, as JSONL (to stdout, or -o FILE)."""

    def go(c: Any) -> bytes | None:
        b = c._json(c.http.get(f"/v1/batches/{batch_id}"))
        file_id = b["error_file_id" if errors else "output_file_id"]
        if file_id is None:
            return None
        resp = c.http.get(f"/v1/files/{file_id}/content")
        if resp.status_code >= 400:
            c._json(resp)
        content: bytes = resp.content
        return content

    data = _call(coordinator_url, data_dir, go)
    if data is None:
        err.print(f"batch {batch_id} has no {'error' if errors else 'output'} file (yet)")
        raise typer.Exit(1)
    if output is not None:
        output.write_bytes(data)
        if as_json:
            return _emit({"path": str(output), "bytes": len(data)})
        out.print(f"wrote {len(data)} bytes to {output}")
        return
    sys.stdout.buffer.write(data)


@batch_app.command("cancel")
def cancel_batch(
    batch_id: str,
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """Cancel a batch: running lines stop, undone ones are refunded."""
    b = _call(
        coordinator_url, data_dir, lambda c: c._json(c.http.post(f"/v1/batches/{batch_id}/cancel"))
    )
    if as_json:
        return _emit(b)
    out.print(f"{b['id']}: {b['status']} ({_counts(b)})")
    if b.get("waiting"):
        out.print(f"  waiting for capacity: {b['waiting']['reason']}")
