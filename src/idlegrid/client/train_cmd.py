"""`idlegrid train run | jobs | show | cancel | plan`: verified training jobs.

`idlegrid train [OPTIONS]` with no command is `train run` (output.DefaultCommandGroup),
and the flat names that predate the sub-app (`jobs`, `job`, `cancel-job`, `plan`) are
hidden aliases for one release (`train_aliases`, wired in cli.py).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from idlegrid.client.market_cmd import _ask, _emit
from idlegrid.client.options import CoordinatorUrl, DataDir, JsonFlag
from idlegrid.client.output import DefaultCommandGroup, show
from idlegrid.client.plan_cmd import plan

out = Console()
err = Console(stderr=True)
MICRO = 1_000_000
ENDED = ("done", "failed", "canceled", "expired")
BARS = " ▁▂▃▄▅▆▇█"


def loss_chart(losses: list[list[float]], width: int = 64, height: int = 8) -> list[str]:
    """The loss curve as text rows (top row first), one column per bucket of steps."""
    if not losses:
        return []
    values = [v for _, v in losses]
    buckets = min(width, len(values))
    cols = []
    for i in range(buckets):
        part = values[i * len(values) // buckets : (i + 1) * len(values) // buckets]
        cols.append(sum(part) / len(part))
    lo, hi = min(cols), max(cols)
    span = (hi - lo) or 1.0
    levels = [round((c - lo) / span * (height * 8 - 1)) for c in cols]
    rows = []
    for r in range(height - 1, -1, -1):
        label = f"{lo + span * (r + 0.5) / height:7.3f} │"
        rows.append(label + "".join(BARS[min(8, max(0, lv + 1 - r * 8))] for lv in levels))
    rows.append(" " * 8 + "└" + "─" * buckets)
    rows.append(
        " " * 9 + f"step {int(losses[0][0])}" + " " * max(1, buckets - 16) + f"{int(losses[-1][0])}"
    )
    return rows


def _short(node: str | None) -> str:
    return node[:10] if node else "-"


def _credits(micro: int) -> str:
    return f"{micro / MICRO:.6f}"


def _audits_table(job: dict[str, Any]) -> Table:
    t = Table(title="audits (beacon-selected segments; canaries test the verifier)")
    for col in ("segment", "provider", "verifier", "kind", "result", "why"):
        t.add_column(col)
    for a in job["audits"]:
        v = a["verdict"] or {}
        if a["canary"]:
            result = {"failed": "[green]rejected[/]", "passed": "[red]approved (lazy)[/]"}.get(
                a["state"], a["state"]
            )
        else:
            result = {"passed": "[green]passed[/]", "failed": "[red]FAILED[/]"}.get(
                a["state"], a["state"]
            )
        t.add_row(
            a["segment"].split(":", 1)[1],
            _short(a["provider"]),
            _short(a["verifier"]),
            "canary" if a["canary"] else "audit",
            result,
            str(v.get("reason", "")),
        )
    return t


def _bill_table(job: dict[str, Any]) -> Table:
    b = job["bill"]
    t = Table(title="bill (credits)")
    t.add_column("item")
    t.add_column("credits", justify="right")
    steps = job["verified_step"]
    rows = [
        ("escrowed at submission", b["escrowed"]),
        (f"paid for {steps} verified steps", b["charged"]),
        ("  of which to providers", b["to_providers"]),
        ("  of which protocol fee", b["fees"]),
        ("refunded (unused escrow)", b["refunded"]),
        ("still in escrow", b["held"]),
        ("compensation from slashed stake", b["compensated"]),
        ("verifiers paid (from fees)", b["to_verifiers"]),
        ("provider stake slashed", b["slashed"]),
    ]
    for name, amount in rows:
        t.add_row(name, _credits(amount))
    return t


def _print_job(job: dict[str, Any]) -> None:
    out.print(
        f"[bold]{job['id']}[/]: {job['state']}, {job['verified_step']}/{job['steps']} "
        f"steps verified ({job['committed_step']} committed)"
        + (f"; error: {job['error']}" if job.get("error") else "")
    )
    market = job.get("market") or {}
    if market.get("waiting"):
        out.print(
            f"waiting for placement (order {market['order_id']}): "
            + (market.get("decisive") or "not matched yet")
        )
    elif market.get("providers"):
        gang = (market.get("placement") or {}).get("gang")
        if gang:
            ranks = ", ".join(f"rank {m['rank']} {_short(m['provider'])}" for m in gang["members"])
            out.print(f"placed as a gang ({ranks}; {gang['step_s']:.3g} s a step planned)")
            if market.get("runs"):
                out.print(f"runs: {market['runs']}")
        else:
            out.print(f"placed on {', '.join(_short(p) for p in market['providers'])}")
    chart = loss_chart(job["losses"])
    if chart:
        out.print("loss curve:")
        for row in chart:
            out.print(row, highlight=False, markup=False)
    seg = Table(title="segments")
    for col in ("segment", "steps", "provider", "state", "cause"):
        seg.add_column(col)
    for s in job["segments"]:
        seg.add_row(
            str(s["index"]),
            f"{s['start_step']}-{s['end_step'] - 1}",
            _short(s["provider"]),
            s["state"],
            s["cause"],
        )
    show(seg, out)
    if job["audits"]:
        show(_audits_table(job), out)
    if job.get("disputes"):
        dt = Table(title="disputes (a provider contests a failed audit)")
        for col in ("dispute", "audit", "state", "phase", "ruling"):
            dt.add_column(col)
        for d in job["disputes"]:
            r = d.get("ruling") or {}
            ruling = (
                f"{'provider' if r['provider_right'] else 'challenger'} right: {r['reason']}"
                if "provider_right" in r
                else "-"
            )
            dt.add_row(d["id"], d["audit_id"], d["state"], d["phase"], ruling[:80])
        show(dt, out)
    hist = Table(title="history")
    for col in ("time", "event", "cause", "detail"):
        hist.add_column(col)
    skip = {"at", "kind", "cause"}
    for e in job["events"]:
        detail = ", ".join(f"{k}={v}" for k, v in e.items() if k not in skip).replace(
            job["id"] + ":", ""
        )  # segment ids without the job id they all share
        hist.add_row(
            time.strftime("%H:%M:%S", time.localtime(e["at"])), e["kind"], e["cause"], detail[:80]
        )
    show(hist, out)
    show(_bill_table(job), out)


def jobs(
    data_dir: DataDir, coordinator_url: CoordinatorUrl = None, as_json: JsonFlag = False
) -> None:
    """Your training jobs: state, verified steps, last loss, provider."""
    data = _ask(coordinator_url, data_dir, lambda c: c.jobs())
    if as_json:
        return _emit({"jobs": data})
    t = Table(title=f"training jobs ({len(data)})")
    for col in ("job", "state", "verified/steps", "loss", "tok/s", "provider", "cr/step"):
        t.add_column(col)
    for j in data:
        p = j.get("progress") or {}
        t.add_row(
            j["id"],
            j["state"],
            f"{j['verified_step']}/{j['steps']}",
            f"{p['loss']:.4f}" if "loss" in p else "-",
            f"{p['tokens_per_s']:.0f}" if "tokens_per_s" in p else "-",
            _short(j["provider"]),
            _credits(j["price_per_step"]),
        )
    show(t, out)


def job(
    job_id: Annotated[str, typer.Argument(help="Job id (from `idlegrid train jobs`).")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """One training job: loss curve, segments, audits, history (each with its cause), bill."""
    data = _ask(coordinator_url, data_dir, lambda c: c.job(job_id))
    if as_json:
        return _emit(data)
    _print_job(data)


def train(
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 64,
    interval: Annotated[int, typer.Option(help="Steps per segment (audit unit).")] = 8,
    layers: Annotated[int, typer.Option(help="Transformer blocks.")] = 2,
    dim: Annotated[int, typer.Option(help="Model width.")] = 64,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    seq: Annotated[int, typer.Option(help="Context length (bytes).")] = 32,
    batch: Annotated[int, typer.Option(help="Windows per step.")] = 8,
    windows: Annotated[int, typer.Option(help="Training windows cut from the text.")] = 512,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and data order.")] = 0,
    price: Annotated[float, typer.Option(help="Credits per step.")] = 0.001,
    stake: Annotated[float, typer.Option(help="Stake a provider locks (credits).")] = 0.1,
    max_price: Annotated[
        float | None,
        typer.Option(help="Most a provider's device-hour may cost to be placed (credits)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many s.")] = 900,
    as_json: JsonFlag = False,
) -> None:
    """Train the small GPT on Python's own stdlib text on the grid, verified: prints the loss
    curve, the audit results and the bill (`--json`: the job as JSON)."""
    from idlegrid.client.progress import make_progress
    from idlegrid.training.verified import corpus_sha256

    spec = {
        "model": {
            "arch": "gpt",
            "vocab": 256,
            "seq": seq,
            "layers": layers,
            "dim": dim,
            "heads": heads,
        },
        "dataset": {"ref": "stdlib:v1", "sha256": corpus_sha256("stdlib:v1"), "windows": windows},
        "optimizer": {"name": "adamw", "lr": lr, "betas": [0.9, 0.95], "weight_decay": 0.0},
        "init_seed": seed,
        "job_seed": seed,
        "batch_size": batch,
        "steps": steps,
        "checkpoint_interval": interval,
        "price_per_step": round(price * MICRO),
        "stake_required": round(stake * MICRO),
    }

    def follow(c: Any) -> dict[str, Any]:
        view = c.submit_job(
            spec, resources={"max_price": max_price} if max_price is not None else None
        )
        job_id = view["id"]
        if not as_json:
            err.print(
                f"submitted [bold]{job_id}[/]: {steps} steps, "
                f"{view['escrow'] / MICRO:.6f} credits escrowed"
            )
        began = time.monotonic()
        deadline = began + timeout
        hinted = False
        with make_progress(err, quiet=as_json) as progress:
            trained = progress.add_task("training", total=steps, rate="")
            verified = progress.add_task("verified", total=steps, rate="")
            while view["state"] not in ENDED:
                if time.monotonic() > deadline:
                    err.print(
                        f"[yellow]still running after {timeout:.0f} s[/]; follow it with "
                        f"`idlegrid train show {job_id}`"
                    )
                    if as_json:  # the job as it stands: a script gets its id either way
                        _emit(view)
                    raise typer.Exit(2)
                try:
                    time.sleep(0.5)  # polling the coordinator's view of the job
                except KeyboardInterrupt:
                    err.print(
                        f"stopped following; the job goes on: `idlegrid train show {job_id}`, "
                        f"or `idlegrid train cancel {job_id}`"
                    )
                    raise typer.Exit(130) from None
                view = c.job(job_id)
                if view["state"] == "queued" and not hinted and time.monotonic() - began > 15:
                    hinted = True
                    market = view.get("market") or {}
                    why = (
                        f"; the market cannot place it: {market['decisive']} (`idlegrid "
                        f"explain {market['order_id']}`)"
                        if market.get("decisive")
                        else ""
                    )
                    err.print(
                        "[yellow]no training provider has taken the job yet[/] (a local "
                        f"grid needs `idlegrid up --train`){why}"
                    )
                p = view.get("progress") or {}
                rate = f"loss {p['loss']:.3f}, {p['tokens_per_s']:.0f} tok/s" if "loss" in p else ""
                progress.update(
                    trained, completed=max(view["committed_step"], p.get("step", 0)), rate=rate
                )
                progress.update(
                    verified,
                    completed=view["verified_step"],
                    rate=f"{len(view['audits'])} audit(s)",
                )
        return dict(view)

    view = _ask(coordinator_url, data_dir, follow)
    if as_json:
        out.print_json(json.dumps(view))
    else:
        _print_job(view)
    if view["state"] != "done":
        raise typer.Exit(1)


def cancel_job(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """Cancel a training job: verified steps stay paid, the rest of the escrow comes back."""
    data = _ask(coordinator_url, data_dir, lambda c: c.cancel_job(job_id))
    if as_json:
        return _emit(data)
    out.print(
        f"{data['id']}: {data['state']}; refunded {_credits(data['bill']['refunded'])} credits"
    )


train_app = typer.Typer(cls=DefaultCommandGroup)
train_app.command("run")(train)
train_app.command("jobs")(jobs)
train_app.command("show")(job)
train_app.command("cancel")(cancel_job)
train_app.command("plan")(plan)
# The flat names before the sub-app: hidden top-level aliases for one release.
train_aliases: dict[str, Any] = {"jobs": jobs, "job": job, "cancel-job": cancel_job, "plan": plan}
