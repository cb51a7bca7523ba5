"""Seeded books and order streams with a realistic hardware mix, for tests and benchmarks.

The mix follows what decentralised markets list: mostly consumer cards (Vast's 10k+
listings are dominated by 3090/4090-class cards), a minority of datacenter GPUs priced
per device-hour near cloud rates, and a few Apple and CPU hosts, spread over 8 regions.
"""

from __future__ import annotations

import random
from dataclasses import replace

from idlegrid.core.ledger import MICRO, Price
from idlegrid.core.market.hardware import BY_NAME, Device, Hardware
from idlegrid.core.market.offers import Offer
from idlegrid.core.market.orders import Order, OrderKind
from idlegrid.core.market.spec import Bound, RegionRule, ResourceSpec

REGIONS = (
    "us-east",
    "us-west",
    "eu-west",
    "eu-central",
    "ap-south",
    "ap-east",
    "sa-east",
    "af-south",
)
# model, share of the book, typical $/device-hour, devices per host choices
MIX = (
    ("RTX-3060", 0.10, 0.06, (1, 2)),
    ("RTX-3080", 0.07, 0.10, (1, 2)),
    ("RTX-3090", 0.12, 0.16, (1, 2, 4)),
    ("RTX-4060-Ti-16GB", 0.06, 0.09, (1,)),
    ("RTX-4070S", 0.07, 0.12, (1, 2)),
    ("RTX-4080", 0.06, 0.18, (1, 2)),
    ("RTX-4090", 0.16, 0.30, (1, 2, 4, 8)),
    ("RTX-5090", 0.04, 0.50, (1, 2)),
    ("RTX-A6000", 0.04, 0.45, (1, 2, 4)),
    ("L40S", 0.04, 0.75, (1, 4, 8)),
    ("A100-80GB", 0.08, 1.10, (1, 4, 8)),
    ("H100-SXM", 0.07, 2.00, (8,)),
    ("H200", 0.02, 3.00, (8,)),
    ("M3-Max", 0.01, 0.08, (1,)),
)
SMALL_MODELS = {"gemma3:270m": 0.6, "llama3.2:3b": 2.5, "qwen2.5:7b": 5.5}
BIG_MODELS = {"llama3.1:70b": 42.0}
MODEL_VRAM = {**SMALL_MODELS, **BIG_MODELS}


def make_book(n: int, seed: int = 0) -> list[Offer]:
    """`n` offers with the realistic mix, seeded."""
    rng = random.Random(seed)
    models = [m[0] for m in MIX]
    weights = [m[1] for m in MIX]
    info = {m[0]: m for m in MIX}
    offers = []
    for i in range(n):
        name = rng.choices(models, weights)[0]
        _, _, usd, counts = info[name]
        g = BY_NAME[name]
        count = rng.choice(counts)
        price = round(usd * rng.uniform(0.7, 1.4) * MICRO)  # 1 credit ≈ $1
        tps = {
            m: g.mem_bw_gbs / (vram * 0.6) * rng.uniform(0.8, 1.1)
            for m, vram in MODEL_VRAM.items()
            if vram * 1.2 <= g.vram_gb * count
        }
        token_prices = {
            m: Price(price // 20, round(price / 3600 / t * 1e6 * 1.5)) for m, t in tps.items()
        }
        hw = Hardware(
            provider=f"p{i:05d}",
            region=rng.choice(REGIONS),
            devices=(Device(name, count, g.vram_gb, vendor=g.vendor),),
            cpus=rng.choice((4, 8, 16, 32, 64)) * max(1, count // 2),
            ram_gb=rng.choice((16, 32, 64, 128, 256)) * max(1, count // 2),
            tokens_per_s=tps,
            reliability=round(min(1.0, rng.betavariate(30, 1)), 4),
            verified=rng.random() < 0.7,
        )
        offers.append(Offer(f"p{i:05d}/{name}", hw, hw.devices[0], price, token_prices))
    return offers


def make_orders(n: int, seed: int = 1) -> list[Order]:
    """`n` orders: small-model inference, batch jobs, leases and multi-GPU training."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        region = (
            RegionRule(frozenset(rng.sample(REGIONS, 3))) if rng.random() < 0.3 else RegionRule()
        )
        rel = Bound(">=", 0.95) if rng.random() < 0.3 else None
        if r < 0.45:
            model = rng.choice(list(SMALL_MODELS))
            spec = ResourceSpec(
                region=region,
                reliability=rel,
                max_price=1.0,
                min_tokens_per_s=rng.choice((None, 20.0, 50.0)),
            )
            out.append(
                Order(
                    f"o{i}",
                    OrderKind.INFERENCE,
                    spec,
                    model=model,
                    hours=rng.choice((1, 4, 24)),
                    vram_need_gb=SMALL_MODELS[model],
                    max_price=MICRO,
                )
            )
        elif r < 0.65:
            model = rng.choice(list(MODEL_VRAM))
            spec = ResourceSpec(region=region, reliability=rel, max_price=200.0)
            out.append(
                Order(
                    f"o{i}",
                    OrderKind.BATCH,
                    spec,
                    model=model,
                    tokens=rng.choice((10**5, 10**6, 10**7)),
                    vram_need_gb=MODEL_VRAM[model],
                    max_price=200 * MICRO,
                )
            )
        elif r < 0.85:
            need = rng.choice((8.0, 16.0, 24.0, 48.0))
            spec = ResourceSpec(
                vram_gb=Bound(">=", need), region=region, reliability=rel, max_price=4.0
            )
            out.append(
                Order(
                    f"o{i}",
                    OrderKind.LEASE,
                    spec,
                    hours=rng.choice((1, 8, 72)),
                    vram_need_gb=need,
                    max_price=4 * MICRO,
                )
            )
        else:
            count = rng.choice((2, 4, 8))
            acc = frozenset(rng.choice((("A100-80GB", "H100-SXM"), ("RTX-4090",), ("H100-SXM",))))
            spec = ResourceSpec(accelerators=acc, count=count, region=region, max_price=4.0)
            out.append(
                Order(
                    f"o{i}",
                    OrderKind.TRAINING,
                    spec,
                    hours=rng.choice((2, 12)),
                    max_price=4 * MICRO,
                )
            )
    return out


def unverified(offers: list[Offer]) -> list[Offer]:
    """The same book with every hardware proof withdrawn."""
    return [replace(o, hardware=replace(o.hardware, verified=False)) for o in offers]
