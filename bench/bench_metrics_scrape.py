"""How long a /metrics scrape takes when 1,000 providers have served (issue 20: ≤ 100 ms).

    PYTHONPATH=src python bench/bench_metrics_scrape.py --providers 1000 --models 2

Every provider gets e2e-latency and time-per-output-token observations for each model
(the per-provider histograms are the series that grow with the grid), plus responses on
60 routes × 5 statuses. Timed: `Metrics.render()`, the body /metrics returns, median of
--repeats. Baseline in the same run: the same registry with one provider.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from idlegrid.coordinator.metrics import Metrics


def filled(providers: int, models: int) -> Metrics:
    """A registry as a grid of `providers` would have it after some traffic."""
    m = Metrics()
    rng = random.Random(7)
    for p in range(providers):
        node = f"{p:064x}"  # node ids are 64 hex characters
        for k in range(models):
            model = f"model-{k}"
            for _ in range(3):
                s = rng.uniform(0.2, 30)
                m.observe_answer(model, node, s, rng.randint(2, 512), rng.uniform(0.05, 2))
                m.tokens.labels(model, "output").inc(100)
    for r in range(60):
        for status in ("200", "400", "401", "404", "429"):
            m.responses.labels(f"/api/v1/route{r}", "POST", status).inc()
    return m


def scrape_ms(m: Metrics, repeats: int) -> tuple[float, int]:
    """Median milliseconds per render, and the body's size."""
    times = []
    body = b""
    for _ in range(repeats):
        began = time.perf_counter()
        body = m.render()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), len(body)


def main() -> None:
    """Print the scrape time at the given grid size and at one provider."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--providers", type=int, default=1000)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    base_ms, base_bytes = scrape_ms(filled(1, a.models), a.repeats)
    ms, size = scrape_ms(filled(a.providers, a.models), a.repeats)
    print(f"1 provider     : {base_ms:7.1f} ms  {base_bytes / 1024:8.0f} KiB")
    print(f"{a.providers} providers: {ms:7.1f} ms  {size / 1024:8.0f} KiB  ({ms / base_ms:.0f}x)")
    print("goal ≤ 100 ms:", "met" if ms <= 100 else "MISSED")


if __name__ == "__main__":
    main()
