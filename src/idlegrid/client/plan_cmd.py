"""`idlegrid train plan topology.json`: place a training job's devices into stages and pipelines."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from idlegrid.client.output import show
from idlegrid.core.planner import parse_topology, plan_topology
from idlegrid.errors import InvalidRequest

EXIT_INVALID = 2


def _fail(message: str) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(EXIT_INVALID)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise _fail(f"{path}: not JSON: {exc.msg} at {where}") from None


def plan(
    topology: Annotated[
        Path,
        typer.Argument(
            help="topology.json: devices, latency_ms, bandwidth_gbps, model, stages, data_parallel"
        ),
    ],
    seconds: Annotated[float, typer.Option(help="search budget in wall-clock seconds")] = 5.0,
    seed: Annotated[int, typer.Option(help="random seed: one seed always searches alike")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Plan pipeline and data-parallel placement for a training job over uneven links."""
    if seconds < 0:
        raise _fail("--seconds must be >= 0")
    try:
        topo = parse_topology(_load(topology))
    except InvalidRequest as exc:
        raise _fail(f"{topology}: {exc.param}: {exc.message}") from None
    result = plan_topology(topo, seconds=seconds, seed=seed, clock=time.monotonic)
    doc = result.to_json(topo)
    if json_out:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    _print_tables(doc, topo.devices, Console())


def _print_tables(doc: dict[str, Any], devices: Any, console: Console) -> None:
    ids = [d.id for d in devices]
    regions = [d.region for d in devices]
    n_stages, n_pipes = len(doc["stages"]), len(doc["pipelines"])
    console.print(
        f"[bold]{len(ids)} devices → {n_stages} stages × {n_pipes} pipelines[/]  "
        f"objective {doc['objective']}, {doc['evaluations']} plans scored in "
        f"{doc['seconds']:.1f} s, seed {doc['seed']}"
    )
    stages = Table(title="Stages (data-parallel groups, pipeline order)")
    stages.add_column("stage", justify="right")
    stages.add_column("devices")
    stages.add_column("regions")
    for j, row in enumerate(doc["stages"]):
        stages.add_row(
            str(j), " ".join(ids[v] for v in row), ", ".join(dict.fromkeys(regions[v] for v in row))
        )
    show(stages, console)
    pipes = Table(title="Pipelines (one per macro-batch, stage 0 first)")
    pipes.add_column("pipeline", justify="right")
    pipes.add_column("devices")
    for i, col in enumerate(doc["pipelines"]):
        pipes.add_row(str(i), " → ".join(ids[v] for v in col))
    show(pipes, console)
    cost = Table(
        title="Cost per iteration (seconds; full = modelled iteration time, "
        "dtfm = DT-FM's communication cost)"
    )
    for col in ("placement", "full", "pipeline", "bubble", "DP", "dtfm", "vs plan"):
        cost.add_column(col, justify="left" if col == "placement" else "right")
    plan_full = doc["cost"]["full"]["total"]
    rows = [("planner", doc["cost"]), ("DT-FM plan", doc["dtfm_plan"]["cost"])]
    rows += [
        (f"random ×{b['samples']}" if name == "random" else name.replace("_", "-"), b)
        for name, b in doc["baselines"].items()
    ]
    for name, c in rows:
        f = c["full"]
        ratio = f["total"] / plan_full if plan_full > 0 else float("nan")
        cost.add_row(
            name,
            f"{f['total']:.2f}",
            f"{f['pipeline']:.2f}",
            f"{f['bubble']:.2f}",
            f"{f['data_parallel']:.2f}",
            f"{c['dtfm']['total']:.2f}",
            f"{ratio:.2f}×",
        )
    show(cost, console)
