"""Dashboard first paint with 1,000 registered providers, and how far live updates lag.

A real coordinator process (`idlegrid coordinator`) and one real provider process (fake
engine) on loopback; 1,000 simulated providers register through the signed node API and
report power once. Debian's Chromium (Playwright) loads `/` again and again and reads the
browser's own paint timing; then completions are sent with the official openai client and
the time until each shows in the open page's live view is taken. The same measurements
with only the one real provider are the baseline, in the same run.

    .venv/bin/python bench/bench_dashboard.py [--providers 1000] [--loads 7] [--updates 10]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai

from idlegrid import PROTOCOL_VERSION
from idlegrid.agent.node_client import NodeClient
from idlegrid.client.localgrid import LocalGrid
from idlegrid.core.ledger import MICRO
from idlegrid.protocol.signing import NodeKey
from idlegrid.testbed.inprocess import free_port

CARDS = [
    ("NVIDIA GeForce RTX 3060", 170),
    ("NVIDIA GeForce RTX 3080", 320),
    ("NVIDIA GeForce RTX 4060 Ti", 165),
    ("NVIDIA GeForce RTX 4070 SUPER", 220),
    ("NVIDIA GeForce RTX 4090", 450),
    ("Apple M2 Pro GPU", 40),
]
REGIONS = ["eu-west", "eu-central", "us-east", "us-west", "ap-south"]


async def register_simulated(url: str, count: int, concurrency: int = 4) -> float:
    """Register `count` simulated providers with the signed node API; seconds taken."""
    rng = random.Random(7)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        card, watts = CARDS[i % len(CARDS)]
        async with sem:
            # Made inside the semaphore: building a thousand clients up front would hold the
            # event loop for longer than a signature stays fresh.
            client = NodeClient(url, NodeKey.generate())
            try:
                await client.call(
                    "/api/v1/nodes/register",
                    {
                        "protocol_version": PROTOCOL_VERSION,
                        "name": f"sim-{i:04d}",
                        "hardware": {
                            "gpus": [
                                {
                                    "index": 0,
                                    "name": card,
                                    "vendor": "nvidia",
                                    "power_limit_w": watts,
                                }
                            ],
                            "region": REGIONS[i % len(REGIONS)],
                        },
                        "engine": {"engine": "simulated"},
                        "slots": 1,
                        "prefill_tps": rng.uniform(500, 5000),
                        "decode_tps": rng.uniform(20, 150),
                        "offers": [
                            {
                                "model": "fake:1",
                                "prompt_price": 10 * MICRO,
                                "output_price": rng.randint(30, 60) * MICRO,
                            }
                        ],
                    },
                )
                for j in range(2):  # two counter readings, so energy has a difference
                    await client.call(
                        "/api/v1/nodes/heartbeat",
                        {
                            "power": {
                                "joules_total": 100.0 * j * watts,
                                "watts": float(watts),
                                "source": "estimate",
                                "estimated": True,
                            }
                        },
                    )
            finally:
                await client.close()

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - start


def new_context(browser: Any, url: str, operator_key: str) -> Any:
    """A fresh browser profile, logged in through the form at /login."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(url + "/login")
    page.fill("input[name=key]", operator_key)
    page.click("button[type=submit]")
    page.wait_for_selector("#providers")
    page.close()
    return context


def paint_timings(browser: Any, url: str, key: str, loads: int) -> dict[str, float]:
    """Median first paint, first contentful paint, DOMContentLoaded (ms) over fresh loads."""
    fp, fcp, dcl = [], [], []
    for _ in range(loads):
        context = new_context(browser, url, key)
        page = context.new_page()
        page.goto(url + "/", wait_until="load")
        assert page.locator("#providers").count() == 1, "not the dashboard (login page?)"
        page.wait_for_function(
            "() => performance.getEntriesByName('first-contentful-paint').length > 0"
        )
        timing = page.evaluate("""() => {
            const p = Object.fromEntries(performance.getEntriesByType('paint')
                                         .map(e => [e.name, e.startTime]));
            const n = performance.getEntriesByType('navigation')[0];
            return {fp: p['first-paint'], fcp: p['first-contentful-paint'],
                    dcl: n.domContentLoadedEventEnd};
        }""")
        fp.append(timing["fp"] if timing["fp"] is not None else timing["fcp"])
        fcp.append(timing["fcp"])
        dcl.append(timing["dcl"])
        context.close()
    return {
        "first_paint_ms": statistics.median(fp),
        "fcp_ms": statistics.median(fcp),
        "fcp_max_ms": max(fcp),
        "dcl_ms": statistics.median(dcl),
    }


def update_lags(browser: Any, url: str, key: str, api_key: str, updates: int) -> dict[str, float]:
    """Seconds from a completion's response to its row in the open page (median and max)."""
    context = new_context(browser, url, key)
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("#live.on", timeout=30_000)
    loaded = page.evaluate("window.idlegridLoadedAt")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
    lags = []
    for i in range(updates):
        answer = client.completions.create(
            model="fake:1", prompt=f"bench {i}", max_tokens=4, temperature=0
        )
        done = time.perf_counter()
        page.wait_for_selector(f'#recent tr[data-request="{answer.id}"]', timeout=30_000)
        lags.append(time.perf_counter() - done)
    assert page.evaluate("window.idlegridLoadedAt") == loaded, "the page reloaded"
    context.close()
    return {"lag_median_s": statistics.median(lags), "lag_max_s": max(lags)}


def html_timing(url: str, key: str, n: int = 7) -> dict[str, float]:
    """Median time and size of GET / (ms, KiB), each after a change, so each is rebuilt."""
    times, size = [], 0
    with httpx.Client(trust_env=False, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        for i in range(n):
            # Paced past the rebuild interval (2x a build), so this times one build, not the
            # wait for the previous one's interval to pass.
            time.sleep(1.0)
            # A mint is a change: the page cannot come from the shared snapshot cache.
            c.post(
                url + "/api/v1/admin/mint",
                json={"key_id": "bench", "amount": 1, "reference": f"bench-{time.time()}-{i}"},
            ).raise_for_status()
            start = time.perf_counter()
            r = c.get(url + "/")
            r.raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
            size = len(r.content)
    return {"html_ms": statistics.median(times), "html_kib": size / 1024}


def measure(browser: Any, grid: LocalGrid, args: argparse.Namespace) -> dict[str, float]:
    """Every number for the grid as it is now."""
    key = grid.operator_key
    return {
        **html_timing(grid.url, key),
        **paint_timings(browser, grid.url, key, args.loads),
        **update_lags(browser, grid.url, key, grid.api_key, args.updates),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--providers", type=int, default=1000)
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    grid = LocalGrid(
        data_dir=Path(tempfile.mkdtemp(prefix="idlegrid-bench-dash-")),
        port=free_port(),
        providers=1,
        engine="fake",
        model="fake:1",
        threads=1,
        provider_args=["--skip-benchmark"],
        # Simulated providers never heartbeat again: keep them counted as live.
        extra_env={"IDLEGRID_NODE_TIMEOUT_S": "3600", "IDLEGRID_POWER_SAMPLE_INTERVAL_S": "0.001"},
    )
    grid.start()
    results: dict[str, dict[str, float]] = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            results["1 provider"] = measure(browser, grid, args)
            # Playwright's sync API owns this thread's event loop; register from another.
            with ThreadPoolExecutor(1) as pool:
                took = pool.submit(
                    asyncio.run, register_simulated(grid.url, args.providers)
                ).result()
            print(
                f"registered {args.providers} simulated providers in {took:.1f} s "
                f"({args.providers / took:.0f}/s, signed, with 2 power reports each)"
            )
            label = f"{args.providers + 1} providers"
            results[label] = measure(browser, grid, args)
            browser.close()
    finally:
        grid.stop()
    cols = [
        "html_ms",
        "html_kib",
        "first_paint_ms",
        "fcp_ms",
        "fcp_max_ms",
        "dcl_ms",
        "lag_median_s",
        "lag_max_s",
    ]
    print("| grid | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for label, r in results.items():
        print(
            f"| {label} | "
            + " | ".join(f"{r[c]:.3f}" if c.endswith("_s") else f"{r[c]:.0f}" for c in cols)
            + " |"
        )


if __name__ == "__main__":
    main()
