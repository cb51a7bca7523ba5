"""`idlegrid earnings` and `idlegrid estimate`: what providers earn, spend on power, and keep."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from idlegrid.client.options import CoordinatorUrl, DataDir, JsonFlag
from idlegrid.client.output import show
from idlegrid.core import economics
from idlegrid.core.economics import CardSpec, Period, Prices
from idlegrid.errors import InvalidRequest

console = Console(stderr=True)
out = Console()

KwhPrice = Annotated[
    float, typer.Option("--kwh-price", help="What you pay per kWh, in your currency.")
]
CreditValue = Annotated[
    float, typer.Option("--credit-value", help="What one credit is worth in that currency.")
]
CardPrice = Annotated[
    float | None,
    typer.Option("--card-price", help="Purchase price of the card, for the payback time."),
]


def _prices(kwh_price: float, credit_value: float, card_price: float | None) -> Prices:
    try:
        return Prices(kwh_price=kwh_price, credit_value=credit_value, card_price=card_price)
    except InvalidRequest as exc:
        raise typer.BadParameter(exc.message) from exc


def _money(value: float) -> str:
    return f"{value:,.4f}"


def _days(value: float | None) -> str:
    return "never" if value is None else f"{value:,.0f} d"


def _sources(income: dict[str, int]) -> str:
    """`tokens 0.0021, verifier fees 0.0003`: the sources that paid anything."""
    parts = [f"{k} {v / 1e6:,.6f}" for k, v in income.items() if v]
    return ", ".join(parts) or "—"


def _est(text: str, estimated: bool) -> str:
    return f"{text} [yellow](est.)[/]" if estimated else text


def earnings(
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    node: Annotated[str | None, typer.Option(help="One provider, by name or id.")] = None,
    period: Annotated[str, typer.Option(help="Look back this far: 90m, 24h, 7d.")] = "24h",
    kwh_price: KwhPrice = 0.30,
    credit_value: CreditValue = 1.0,
    card_price: CardPrice = None,
    as_json: JsonFlag = False,
) -> None:
    """Earnings for work (never minted or staked credits) by source, energy, electricity
    cost, profit per day and payback, per provider."""
    from idlegrid.client.localgrid import find_grid
    from idlegrid.client.sdk import GridAPIError, GridClient

    prices = _prices(kwh_price, credit_value, card_price)
    url, _ = find_grid(coordinator_url, data_dir)
    try:
        with GridClient(url) as client:
            data = client.earnings(period=period, node=node)
    except GridAPIError as exc:
        console.print(f"[red]{exc.message}[/]")
        raise typer.Exit(2) from exc
    span = Period(data["since"], data["until"])
    rows = []
    for p in data["providers"]:
        report = economics.report(
            p["earned"], p["energy_j"], span, prices, energy_estimated=p["energy_estimated"]
        )
        rows.append({**p, "economics": report.to_dict(), "kwh": p["energy_j"] / 3.6e6})
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "period": period,
                    "period_s": data["period_s"],
                    "kwh_price": kwh_price,
                    "credit_value": credit_value,
                    "card_price": card_price,
                    "providers": rows,
                }
            )
        )
        return
    table = Table(title=f"Provider earnings over the last {period} at {url}")
    for col in (
        "provider",
        "earned cr",
        "by source cr",
        "accrued cr",
        "paid cr",
        "energy kWh",
        "tokens/J",
        "earned/day",
        "power/day",
        "profit/day",
        "payback",
    ):
        table.add_column(col, justify="left" if col == "provider" else "right")
    for r in rows:
        e = r["economics"]
        tpj = r["tokens_per_joule"]
        table.add_row(
            r["name"],
            f"{r['earned'] / 1e6:,.6f}",
            _sources(r.get("income") or {}),
            f"{r['accrued'] / 1e6:,.6f}",
            f"{r['paid'] / 1e6:,.6f}",
            _est(f"{r['kwh']:.4f}", r["energy_estimated"]),
            "—" if tpj is None else _est(f"{tpj:.3f}", r["request_energy_estimated"]),
            _money(e["earned_per_day"]),
            _est(_money(e["electricity_per_day"]), e["estimated"]),
            _money(e["profit_per_day"]),
            _days(e["payback_days"]),
        )
    show(table, out)
    out.print(
        f"electricity {kwh_price:g}/kWh · 1 credit = {credit_value:g}"
        + (f" · card {card_price:g}" if card_price is not None else "")
        + " · (est.) = from rated power, not a meter"
    )


def estimate(
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    model: Annotated[str, typer.Option(help="Model the card would serve.")] = "gemma3:270m",
    decode_tps: Annotated[
        float | None,
        typer.Option(help="Measured output tokens/s (default: load the model here and measure)."),
    ] = None,
    engine: Annotated[str, typer.Option(help="Engine to measure with.")] = "llama.cpp",
    model_path: Annotated[Path | None, typer.Option(help="GGUF file for --model.")] = None,
    watts: Annotated[
        float | None,
        typer.Option(help="Draw while serving (default: the card's rated power, an estimate)."),
    ] = None,
    idle_watts: Annotated[
        float | None, typer.Option(help="Draw while idle (default: a fifth of --watts).")
    ] = None,
    utilisation: Annotated[
        float,
        typer.Option(help="Fraction of the day spent serving (demand is assumed, not known)."),
    ] = 0.5,
    prompt_ratio: Annotated[
        float, typer.Option(help="Prompt tokens billed per output token.")
    ] = 0.0,
    kwh_price: KwhPrice = 0.30,
    credit_value: CreditValue = 1.0,
    card_price: CardPrice = None,
    as_json: JsonFlag = False,
) -> None:
    """What would my card earn? Live market prices × this card's measured speed, minus power."""
    from idlegrid.agent.hardware.power import IDLE_FRACTION, rated_watts
    from idlegrid.agent.hardware.probe import probe
    from idlegrid.client.localgrid import find_grid
    from idlegrid.client.sdk import GridAPIError, GridClient

    prices = _prices(kwh_price, credit_value, card_price)
    url, _ = find_grid(coordinator_url, data_dir)
    try:
        with GridClient(url) as client:
            market = client.market_prices()
    except GridAPIError as exc:
        console.print(f"[red]{exc.message}[/]")
        raise typer.Exit(2) from exc
    offer = next((m for m in market["models"] if m["model"] == model), None)
    if offer is None:
        console.print(
            f"[red]no live provider offers {model} on {url}; nothing to price it "
            f"against[/] (models: {', '.join(m['model'] for m in market['models'])})"
        )
        raise typer.Exit(2)
    hardware = probe().to_dict()
    measured = decode_tps is None
    if decode_tps is None:
        decode_tps = _measure(engine, model, model_path, quiet=as_json)
    serving = watts if watts is not None else rated_watts(hardware)
    idle = idle_watts if idle_watts is not None else serving * IDLE_FRACTION
    try:
        card = CardSpec(
            decode_tps=decode_tps,
            serving_watts=serving,
            idle_watts=idle,
            utilisation=utilisation,
            prompt_tokens_per_output=prompt_ratio,
            watts_estimated=watts is None,
        )
    except InvalidRequest as exc:
        raise typer.BadParameter(exc.message) from exc
    report = economics.estimate_card(
        card, offer["output_median"], offer["prompt_median"], market["fee_bps"], prices
    )
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "model": model,
                    "market": offer,
                    "fee_bps": market["fee_bps"],
                    "decode_tps": decode_tps,
                    "decode_tps_measured": measured,
                    "serving_watts": serving,
                    "idle_watts": idle,
                    **report.to_dict(),
                }
            )
        )
        return
    table = Table(
        title=f"Estimate for this card serving {model} (median market price)", show_header=False
    )
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row(
        "market output price",
        f"{offer['output_median'] / 1e6:g} cr / 1M tokens ({offer['providers']} providers)",
    )
    table.add_row(
        "your speed",
        f"{decode_tps:.1f} tok/s"
        f" ({'measured here' if measured else 'given'}; market median "
        f"{offer['decode_tps_median']:.1f})",
    )
    table.add_row(
        "earned / day", f"{report.earned_credits_per_day:,.4f} cr = {_money(report.earned_per_day)}"
    )
    table.add_row("energy / day", f"{report.kwh_per_day:.3f} kWh")
    table.add_row("electricity / day", _money(report.electricity_per_day))
    table.add_row("profit / day", _money(report.profit_per_day))
    table.add_row("payback", _days(report.payback_days))
    show(table, out)
    out.print("[yellow]An estimate:[/] " + "; ".join(report.assumptions))


def _measure(engine: str, model: str, model_path: Path | None, *, quiet: bool) -> float:
    from idlegrid.agent.hardware.benchmark import measure_speed
    from idlegrid.client.progress import make_progress
    from idlegrid.engines.registry import load_engine

    kwargs: dict[str, Any] = {"model_path": model_path} if model_path else {}
    with make_progress(console, quiet=quiet) as progress:
        task = progress.add_task(f"loading {model} on {engine}", total=None, rate="")
        eng = load_engine(engine, model, **kwargs)
        progress.update(task, description="measuring decode speed", total=1, completed=0)
        began = time.monotonic()

        def step(done: int, total: int) -> None:
            elapsed = time.monotonic() - began
            rate = f"{done / elapsed:.1f} tok/s" if elapsed > 0 else ""
            progress.update(task, completed=done, total=total, rate=rate)

        try:
            speed = measure_speed(eng, on_token=step)
        finally:
            eng.close()
    return speed.decode_tps
