"""Market benchmark: match rate, match quality, fit, and orders/s through the API.

    PYTHONPATH=src python bench/bench_market.py [--offers 10000] [--orders 3000] [--rounds 5]

1. Match rate of the matching core on one core: orders matched per second against a
   10,000-offer book with the realistic mix (scenarios.make_book: consumer and datacenter
   cards over 8 regions), beside a per-offer Python scan of the same filters and score
   (the baseline a straightforward implementation would be). Medians over rounds.
2. Match quality: a sample of single-device orders on the same book, total score of the
   placements ÷ the optimum of the assignment problem (scipy linear_sum_assignment over
   every order × every free device), for one-at-a-time matching and for batch clearing.
3. Fit: share of small-model orders placed on datacenter/workstation cards while a
   fitting consumer card was free, on the book with every fifth datacenter offer at a
   fifth of its price (idle capacity sold off); beside a price-only auction on the same
   book, which shows the rule bites.
4. End to end: a coordinator process on SQLite with the 10,000 offers in its store,
   8 client threads POSTing orders; orders accepted (matched and prepaid) per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core for the matching core
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from idlegrid.core.ledger import MICRO  # noqa: E402
from idlegrid.core.market.auction import (  # noqa: E402
    BIG_TIERS,
    CONSUMER_MAX_VRAM_GB,
    OVERSIZE,
    Book,
    Placement,
)
from idlegrid.core.market.hardware import BY_NAME  # noqa: E402
from idlegrid.core.market.orders import Order, OrderKind  # noqa: E402
from idlegrid.core.market.scenarios import make_book, make_orders  # noqa: E402
from idlegrid.testbed.inprocess import free_port  # noqa: E402


def scan_match(offers: list[Any], free: list[int], order: Order) -> int | None:
    """Baseline: the same filters and score, one offer at a time in Python."""
    best, best_key = None, None
    spec = order.spec
    for i, o in enumerate(offers):
        if free[i] <= 0 or not o.staked:
            continue
        model_ok = order.model is None or order.kind not in (OrderKind.INFERENCE, OrderKind.BATCH)
        if not model_ok and order.model not in o.model_prices:
            continue
        vram = o.device.vram_gb or BY_NAME[o.device.model].vram_gb
        if spec.accelerators is not None and o.device.model not in spec.accelerators:
            continue
        if order.vram_need_gb and vram < order.vram_need_gb:
            continue
        if spec.vram_gb is not None and not spec.vram_gb.test(vram):
            continue
        if spec.reliability is not None and not spec.reliability.test(o.hardware.reliability):
            continue
        if not spec.region.allows(o.hardware.region):
            continue
        tps = o.hardware.tokens_per_s.get(order.model, 0.0) * (1.0 if o.hardware.verified else 0.8)
        if spec.min_tokens_per_s is not None and tps < spec.min_tokens_per_s:
            continue
        batch = order.kind is OrderKind.BATCH
        unit = o.model_prices[order.model].output if batch else o.device_hour
        if unit > order.max_price:
            continue
        count = 1 if batch else order.devices
        if free[i] < count:
            continue
        cost = unit * order.tokens / 1e6 if batch else unit * order.hours
        key = (
            BY_NAME[o.device.model].tier in BIG_TIERS
            and order.vram_need_gb <= CONSUMER_MAX_VRAM_GB,
            cost / max(o.hardware.reliability, 0.01),
        )
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def match_rate(offers: list[Any], orders: list[Order], rounds: int) -> dict[str, Any]:
    core, scan = [], []
    for _ in range(rounds):
        book = Book(offers)
        t = time.perf_counter()
        matched = 0
        for o in orders:
            p = book.match(o)
            if isinstance(p, Placement):
                book.take(p)
                matched += 1
        core.append(len(orders) / (time.perf_counter() - t))
        free = [o.device.count for o in offers]
        sample = orders[:200]
        t = time.perf_counter()
        for o in sample:
            i = scan_match(offers, free, o)
            if i is not None:
                free[i] -= 1 if o.kind is OrderKind.BATCH else o.devices
        scan.append(len(sample) / (time.perf_counter() - t))
    return {
        "core_orders_per_s": statistics.median(core),
        "matched": matched,
        "orders": len(orders),
        "scan_orders_per_s": statistics.median(scan),
        "speedup": statistics.median(core) / statistics.median(scan),
        "rounds": rounds,
    }


def quality(offers: list[Any], orders: list[Order], sample: int) -> dict[str, Any]:
    from scipy.optimize import linear_sum_assignment

    singles = [o for o in orders if o.devices == 1][:sample]
    book = Book(offers)
    slots = np.array([i for i, off in enumerate(offers) for _ in range(off.device.count)])
    cost = np.vstack([book.costs(o)[slots] for o in singles])
    cost[~np.isfinite(cost)] = 1e30
    rows, cols = linear_sum_assignment(cost)
    feasible = cost[rows, cols] < 1e29
    optimum = float(cost[rows, cols][feasible].sum())
    placeable = {singles[r].id for r in rows[feasible]}
    greedy_book, total_greedy = Book(offers), 0.0
    for o in singles:
        p = greedy_book.match(o)
        if isinstance(p, Placement):
            greedy_book.take(p)
            if o.id in placeable:
                total_greedy += p.score + (1e15 if p.oversized else 0.0)
    clear_book = Book(offers)
    total_clear = sum(
        p.score + (1e15 if p.oversized else 0.0)
        for o, p in zip(singles, clear_book.clear(singles), strict=True)
        if isinstance(p, Placement) and o.id in placeable
    )
    return {
        "orders": len(singles),
        "optimum": optimum,
        "greedy_ratio": total_greedy / optimum,
        "batch_clear_ratio": total_clear / optimum,
    }


def fit(offers: list[Any], orders: list[Order]) -> dict[str, Any]:
    """Small-model orders on big cards while a fitting consumer card was free."""
    small = [
        o
        for o in orders
        if o.vram_need_gb and o.vram_need_gb <= CONSUMER_MAX_VRAM_GB and o.devices == 1
    ]

    def run(book: Book, price_only: bool) -> tuple[int, int]:
        wasted = placed = 0
        for o in small:
            if price_only:
                costs = book.costs(o)
                costs = np.where(costs >= OVERSIZE, costs - OVERSIZE, costs)  # fit ignored
                costs[book.free <= 0] = np.inf
                i = int(np.argmin(costs))
                if not np.isfinite(costs[i]):
                    continue
                p = book._placement(o, [(i, 1, int(book.price_h[i]))], 1.0, False, 0.0, 0)
                big = bool(book.big[i])
            else:
                p = book.match(o)
                if not isinstance(p, Placement):
                    continue
                big = p.oversized
            if big:
                fitting_free = book.costs(o)
                free_consumer = (~book.big) & (book.free > 0) & np.isfinite(fitting_free)
                wasted += int(free_consumer.any())
            book.take(p)
            placed += 1
        return wasted, placed

    # Idle datacenter capacity sold off cheap (spot-style) is where price alone goes wrong:
    # every fifth datacenter offer at a fifth of its price.
    offers = [
        replace(o, device_hour=o.device_hour // 5)
        if BY_NAME[o.device.model].tier in BIG_TIERS and i % 5 == 0
        else o
        for i, o in enumerate(offers)
    ]
    w, n = run(Book(offers), False)
    wb, nb = run(Book(offers), True)
    return {
        "small_orders": n,
        "wasted": w,
        "share": w / max(n, 1),
        "price_only_wasted": wb,
        "price_only_share": wb / max(nb, 1),
    }


def seed_store(url: str, offers: list[Any]) -> None:
    """Write the book into a coordinator database as registered, live nodes."""
    from sqlalchemy import insert

    from idlegrid.coordinator.db import tables as schema
    from idlegrid.coordinator.db.store import Store, migrate

    migrate(url)
    store = Store(url, time.time)
    now = time.time()
    with store.tx() as s:
        s.execute(
            insert(schema.Node),
            [
                {
                    "id": o.provider,
                    "public_key": "00" * 32,
                    "name": o.provider,
                    "protocol_version": 1,
                    "hardware": {
                        "cpu_logical": o.hardware.cpus,
                        "ram_bytes": int(o.hardware.ram_gb * 1e9),
                    },
                    "engine": {},
                    "slots": 1,
                    "prefill_tps": 1000.0,
                    "decode_tps": max(o.hardware.tokens_per_s.values(), default=0.0),
                    "state": "live",
                    "registered_at": now,
                    "last_seen": now,
                }
                for o in offers
            ],
        )
        s.execute(
            insert(schema.Offer),
            [
                {
                    "node_id": o.provider,
                    "model_id": m,
                    "prompt_price": p.prompt,
                    "output_price": p.output,
                }
                for o in offers
                for m, p in o.model_prices.items()
            ],
        )
        s.execute(
            insert(schema.DeviceOffer),
            [
                {
                    "node_id": o.provider,
                    "device_model": o.device.model,
                    "count": o.device.count,
                    "vram_gb": o.device.vram_gb,
                    "price_h": o.device_hour,
                    "plugin": None,
                }
                for o in offers
            ],
        )
        s.execute(
            insert(schema.NodeMarket),
            [{"node_id": o.provider, "region": o.hardware.region, "links": {}} for o in offers],
        )
    store.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def end_to_end(
    offers: list[Any], orders: list[Order], clients: int, batch: int = 1
) -> dict[str, Any]:
    load_before = os.getloadavg()[0]  # other work on this shared machine, for the record
    tmp = Path(tempfile.mkdtemp(prefix="idlegrid-bench-market-"))
    url = f"sqlite:///{tmp / 'coordinator.db'}"
    seed_store(url, offers)
    port = free_port()
    env = {
        **os.environ,
        "IDLEGRID_DATA_DIR": str(tmp),
        "IDLEGRID_DATABASE_URL": url,
        "IDLEGRID_NODE_TIMEOUT_S": "1e9",
        "IDLEGRID_STAKE_PER_DEVICE": "0",
        "IDLEGRID_ACCRUAL_INTERVAL_S": "3600",
        "IDLEGRID_HEARTBEAT_INTERVAL_S": "5",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "idlegrid.client.cli",
            "coordinator",
            "--port",
            str(port),
            "--data-dir",
            str(tmp),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, trust_env=False, timeout=60) as c:
            for _ in range(600):
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            # The coordinator wrote its operator key into the data dir before it served.
            operator = {"authorization": f"Bearer {(tmp / 'operator-key').read_text().strip()}"}
            key = c.post("/api/v1/admin/keys", json={"name": "bench"}, headers=operator).json()
            c.post(
                "/api/v1/admin/mint",
                headers=operator,
                json={"key_id": key["key_id"], "amount": 10**9 * MICRO, "reference": "bench"},
            ).raise_for_status()
            headers = {"authorization": f"Bearer {key['api_key']}"}
            warm = c.get("/api/v1/offers", params={"limit": 1}, headers=headers)  # builds the book
            assert warm.json()["total"] == len(offers), warm.text
        bodies = [{**o.to_dict(), "id": f"b{i}"} for i, o in enumerate(orders)]
        statuses: dict[int, int] = {}

        def send(chunk: list[dict[str, Any]]) -> None:
            with httpx.Client(base_url=base, trust_env=False, timeout=60, headers=headers) as cl:
                if batch > 1:
                    for i in range(0, len(chunk), batch):
                        r = cl.post("/api/v1/orders/batch", json={"orders": chunk[i : i + batch]})
                        n = len(chunk[i : i + batch])
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + n
                    return
                for b in chunk:
                    code = cl.post("/api/v1/orders", json=b).status_code
                    statuses[code] = statuses.get(code, 0) + 1

        chunks = [bodies[i::clients] for i in range(clients)]
        cpu0 = _cpu_seconds(proc.pid)
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(send, chunks))
        elapsed = time.perf_counter() - t
        cpu = _cpu_seconds(proc.pid) - cpu0
        with httpx.Client(base_url=base, trust_env=False, timeout=60, headers=headers) as c:
            states: dict[str, int] = {}
            for v in c.get("/api/v1/orders").json()["orders"]:
                states[v["state"]] = states.get(v["state"], 0) + 1
            ok = c.get("/api/v1/ledger/verify", headers=operator).json()["ok"]
        return {
            "orders": len(bodies),
            "clients": clients,
            "batch": batch,
            "seconds": elapsed,
            "coordinator_cpu_ms_per_order": 1000 * cpu / len(bodies),
            "load_before": load_before,
            "orders_per_s": len(bodies) / elapsed,
            "http": statuses,
            "states": states,
            "ledger_ok": ok,
        }
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--offers", type=int, default=10_000)
    ap.add_argument("--orders", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quality-sample", type=int, default=300)
    ap.add_argument("--api-orders", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--skip-api", action="store_true")
    ap.add_argument("--batch", type=int, default=50, help="orders per /orders/batch call")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    offers = make_book(args.offers, seed=0)
    orders = make_orders(args.orders, seed=1)
    results: dict[str, Any] = {"offers": args.offers}
    results["match_rate"] = match_rate(offers, orders, args.rounds)
    results["quality"] = quality(
        offers, make_orders(args.quality_sample * 2, seed=2), args.quality_sample
    )
    results["fit"] = fit(offers, make_orders(args.orders, seed=3))
    if not args.skip_api:
        results["api"] = end_to_end(offers, make_orders(args.api_orders, seed=4), args.clients)
        results["api_batch"] = end_to_end(
            offers, make_orders(args.api_orders, seed=4), args.clients, batch=args.batch
        )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    r = results["match_rate"]
    print(
        f"match rate, one core, {args.offers} offers: {r['core_orders_per_s']:.0f} orders/s "
        f"(Python scan baseline {r['scan_orders_per_s']:.0f}/s, ×{r['speedup']:.0f}); "
        f"{r['matched']}/{r['orders']} matched"
    )
    q = results["quality"]
    print(
        f"match quality on {q['orders']} orders: one-at-a-time {q['greedy_ratio']:.4f} × "
        f"optimum, batch clearing {q['batch_clear_ratio']:.4f} × optimum"
    )
    f = results["fit"]
    print(
        f"fit: {f['wasted']}/{f['small_orders']} small-model orders on big cards while a "
        f"consumer card was free (price-only auction: {f['price_only_wasted']}, "
        f"{f['price_only_share']:.1%})"
    )
    for name in ("api", "api_batch"):
        if name not in results:
            continue
        a = results[name]
        how = "one order per request" if a["batch"] == 1 else f"{a['batch']} per batch request"
        print(
            f"API end to end (SQLite, {a['clients']} clients, {how}): {a['orders_per_s']:.0f} "
            f"orders/s over {a['orders']} orders, coordinator CPU "
            f"{a['coordinator_cpu_ms_per_order']:.1f} ms/order (load avg before "
            f"{a['load_before']:.1f}); HTTP {a['http']}; states {a['states']}; "
            f"ledger ok: {a['ledger_ok']}"
        )


if __name__ == "__main__":
    main()
