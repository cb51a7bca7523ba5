"""Pure grid overhead on the time to first token: a real local grid with the zero-cost
deterministic engine, so every millisecond measured is coordinator, agent, HTTP and client.

    .venv/bin/python bench/bench_overhead_fake.py [--requests 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import openai

from idlegrid.client.localgrid import LocalGrid
from idlegrid.testbed.inprocess import free_port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30)
    args = ap.parse_args()
    grid = LocalGrid(
        data_dir=Path(tempfile.mkdtemp(prefix="idlegrid-bench-")),
        port=free_port(),
        providers=1,
        engine="fake",
        model="fake:1",
        threads=1,
        provider_args=["--skip-benchmark"],
    )
    grid.start()
    try:
        client = openai.OpenAI(base_url=f"{grid.url}/v1", api_key=grid.api_key, max_retries=0)
        ttfts = []
        for _ in range(args.requests):
            start = time.perf_counter()
            stream = client.completions.create(
                model="fake:1", prompt="hello", max_tokens=2, temperature=0, stream=True
            )
            first = None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - start
            assert first is not None
            ttfts.append(first)
        print(
            f"grid-only time to first token: median {1000 * statistics.median(ttfts):.1f} ms, "
            f"min {1000 * min(ttfts):.1f} ms over {len(ttfts)} requests"
        )
    finally:
        grid.stop()


if __name__ == "__main__":
    main()
