"""Provider economics, pure: earnings, electricity cost, profit per day, payback time.

Money in: credits earned (integer µcr from the ledger) and the provider's own prices for
electricity and hardware, in whatever currency they pay their bills in. `credit_value` is
that currency's worth of one credit (1.0 unless told otherwise), so every output is in the
provider's currency per day. A report built on any estimated input is itself marked
`estimated`, with the assumptions that went into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from idlegrid.core.energy import J_PER_KWH
from idlegrid.errors import InvalidRequest

MICRO = 1_000_000  # µcr per credit (as in core.ledger)
SECONDS_PER_DAY = 86_400.0
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are µcr per 1M tokens


@dataclass(frozen=True)
class Period:
    """A span of time in seconds since the epoch; earnings and energy are summed over it."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.end <= self.start:
            raise InvalidRequest("a period must end after it starts", param="period")

    @property
    def seconds(self) -> float:
        """Length in seconds."""
        return self.end - self.start

    @property
    def days(self) -> float:
        """Length in days (86,400 s)."""
        return self.seconds / SECONDS_PER_DAY


def parse_duration(text: str) -> float:
    """Seconds in '90s', '30m', '24h', '7d' (or a bare number of seconds); InvalidRequest if bad."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": SECONDS_PER_DAY, "w": 7 * SECONDS_PER_DAY}
    t = text.strip().lower()
    scale = units.get(t[-1:])
    number = t[:-1] if scale is not None else t
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise InvalidRequest(
            f"not a duration: {text!r} (try 90s, 30m, 24h, 7d)", param="period"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequest(f"a duration must be positive: {text!r}", param="period")
    return value


@dataclass(frozen=True)
class Prices:
    """What the provider pays and what a credit is worth to them, in one currency."""

    kwh_price: float = 0.0  # currency per kWh
    credit_value: float = 1.0  # currency per credit
    card_price: float | None = None  # purchase price of the device, for payback

    def __post_init__(self) -> None:
        for name in ("kwh_price", "credit_value"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidRequest(f"{name} must be a non-negative number", param=name)
        if self.card_price is not None and (
            not math.isfinite(self.card_price) or self.card_price < 0
        ):
            raise InvalidRequest("card_price must be a non-negative number", param="card_price")


@dataclass(frozen=True)
class Report:
    """One device's (or one provider's) economics, per day, in the provider's currency."""

    earned_credits_per_day: float
    earned_per_day: float
    kwh_per_day: float
    electricity_per_day: float
    profit_per_day: float
    payback_days: float | None  # None: no card price given, or the device never pays back
    estimated: bool
    assumptions: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "earned_credits_per_day": self.earned_credits_per_day,
            "earned_per_day": self.earned_per_day,
            "kwh_per_day": self.kwh_per_day,
            "electricity_per_day": self.electricity_per_day,
            "profit_per_day": self.profit_per_day,
            "payback_days": self.payback_days,
            "estimated": self.estimated,
            "assumptions": list(self.assumptions),
        }


def payback_days(card_price: float | None, profit_per_day: float) -> float | None:
    """Days of profit that pay for the card; None without a price or a positive profit."""
    if card_price is None or profit_per_day <= 0:
        return None
    return card_price / profit_per_day


def report(
    earned_ucr: int,
    energy_j: float,
    period: Period,
    prices: Prices,
    *,
    energy_estimated: bool = False,
    assumptions: tuple[str, ...] = (),
) -> Report:
    """Economics of what a device actually earned and used over `period`."""
    if energy_j < 0:
        raise InvalidRequest("energy cannot be negative", param="energy_j")
    credits_day = earned_ucr / MICRO / period.days
    kwh_day = energy_j / J_PER_KWH / period.days
    earned_day = credits_day * prices.credit_value
    power_day = kwh_day * prices.kwh_price
    profit = earned_day - power_day
    return Report(
        credits_day,
        earned_day,
        kwh_day,
        power_day,
        profit,
        payback_days(prices.card_price, profit),
        energy_estimated,
        assumptions,
    )


@dataclass(frozen=True)
class CardSpec:
    """What is known about a card for an earnings estimate."""

    decode_tps: float  # measured output tokens per second on the model
    serving_watts: float  # draw while generating
    idle_watts: float = 0.0  # draw while waiting for work (counted: the card stays on)
    utilisation: float = 0.5  # fraction of the day spent generating
    prompt_tokens_per_output: float = 0.0  # prompt tokens billed per output token
    watts_estimated: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.decode_tps) or self.decode_tps <= 0:
            raise InvalidRequest("decode_tps must be positive", param="decode_tps")
        if self.serving_watts < 0 or self.idle_watts < 0:
            raise InvalidRequest("watts must be non-negative", param="watts")
        if not 0 <= self.utilisation <= 1:
            raise InvalidRequest("utilisation must be between 0 and 1", param="utilisation")
        if self.prompt_tokens_per_output < 0:
            raise InvalidRequest(
                "prompt_tokens_per_output must be non-negative", param="prompt_tokens_per_output"
            )


def estimate_card(
    card: CardSpec, output_price: int, prompt_price: int, fee_bps: int, prices: Prices
) -> Report:
    """What a card would earn per day at market prices (µcr per 1M tokens) and its measured speed.

    Always an estimate: demand (utilisation) is assumed, not observed.
    """
    if output_price < 0 or prompt_price < 0:
        raise InvalidRequest("prices must be non-negative", param="price")
    if not 0 <= fee_bps <= 10_000:
        raise InvalidRequest("fee_bps must be between 0 and 10000", param="fee_bps")
    busy_s = SECONDS_PER_DAY * card.utilisation
    out_tokens = card.decode_tps * busy_s
    prompt_tokens = out_tokens * card.prompt_tokens_per_output
    gross_ucr = (out_tokens * output_price + prompt_tokens * prompt_price) / TOKENS_PER_PRICE_UNIT
    net_ucr = gross_ucr * (1 - fee_bps / 10_000)
    energy_j = card.serving_watts * busy_s + card.idle_watts * (SECONDS_PER_DAY - busy_s)
    day = Period(0.0, SECONDS_PER_DAY)
    assumptions = (
        f"busy {card.utilisation:.0%} of the day at {card.decode_tps:g} output tok/s",
        f"{card.serving_watts:g} W serving, {card.idle_watts:g} W idle"
        + (" (estimated)" if card.watts_estimated else " (measured)"),
        f"{card.prompt_tokens_per_output:g} prompt tokens billed per output token",
        f"protocol fee {fee_bps / 100:g}%",
    )
    return report(
        round(net_ucr), energy_j, day, prices, energy_estimated=True, assumptions=assumptions
    )
