"""The dashboard in a real browser (Debian's Chromium via Playwright) against a real local grid.

A coordinator and two agents (FakeEngine, estimated power) serve on loopback; the official
openai client sends a completion while the pages are open, and the pages must show it
without a reload. Screenshots land in tests/artifacts/dashboard/.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from idlegrid.agent.hardware.power import RatedMeter
from idlegrid.config import CoordinatorSettings
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
)

MODEL = "fake:1"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
REQUIRE_ENV = "IDLEGRID_REQUIRE_BROWSER"

pytestmark = pytest.mark.slow


def chromium_path() -> str:
    """Debian's Chromium; CI (IDLEGRID_REQUIRE_BROWSER=1) fails without it, a laptop skips."""
    path = os.environ.get("IDLEGRID_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    missing = []
    if not Path(path).exists():
        missing.append(f"Chromium at {path} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def local_grid(tmp_path: Path) -> Iterator[tuple[str, str, list[str], str]]:
    settings = CoordinatorSettings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        port=free_port(),
        heartbeat_interval_s=0.3,
        node_timeout_s=3.0,
        power_sample_interval_s=0.5,
        # The pages are under test here, not the stake rule (test_stake_and_payability).
        inference_stake=0,
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agents = []
    for i in range(2):
        agent = make_agent(
            coordinator.url,
            [FakeEngine(MODEL)],
            f"gpu-box-{i}",
            price=Price((10 + i) * MICRO, (40 + i) * MICRO),
            meter=RatedMeter(150.0 + 100 * i),
            hardware={"cpu_cores": 4, "region": "eu-west"},
        )
        thread = AgentThread(agent)
        thread.start()
        agents.append(thread)
    try:
        wait_for_live(coordinator.url, 2)
        with coordinator.admin() as c:
            key = c.post("/api/v1/admin/keys", json={"name": "browser"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 10 * MICRO, "reference": "browser"},
            ).raise_for_status()
            node_ids = [n["id"] for n in c.get("/api/v1/status").json()["nodes"]]
        yield coordinator.url, key["api_key"], node_ids, coordinator.operator_key
    finally:
        for a in agents:
            a.stop()
        coordinator.stop()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_pages_list_providers_and_show_a_completion_live(
    browser: Any, local_grid: tuple[str, str, list[str], str]
) -> None:
    url, api_key, node_ids, operator_key = local_grid
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    # The pages need the operator: log in through the form, which keeps a cookie.
    login = context.new_page()
    login.goto(url + "/")
    assert login.locator("input[name=key]").count() == 1  # locked without it
    login.fill("input[name=key]", operator_key)
    login.click("button[type=submit]")
    login.wait_for_selector("#providers")
    login.close()
    context_cookies = context.cookies()
    grid_page = context.new_page()
    ledger_page = context.new_page()
    grid_page.goto(url + "/")
    ledger_page.goto(url + "/ledger")
    for page in (grid_page, ledger_page):
        page.wait_for_selector("#live.on", timeout=10_000)  # the SSE stream is open

    # The real providers, by the ids the coordinator gave them.
    for node_id in node_ids:
        row = grid_page.locator(f'#providers tr[data-node="{node_id}"]')
        assert row.count() == 1
        assert "eu-west" in row.inner_text()
    assert grid_page.locator('[data-testid="live-providers"]').inner_text() == "2"
    loaded = {p: p.evaluate("window.idlegridLoadedAt") for p in (grid_page, ledger_page)}

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
    answer = client.completions.create(
        model=MODEL, prompt="The dashboard shows", max_tokens=12, temperature=0
    )
    done_at = time.monotonic()
    grid_page.wait_for_selector(f'#recent tr[data-request="{answer.id}"]', timeout=10_000)
    lag_s = time.monotonic() - done_at
    ledger_page.wait_for_selector(
        f'#entries tr[data-cause="{answer.id}"].memo-settle', timeout=10_000
    )
    row = grid_page.locator(f'#recent tr[data-request="{answer.id}"]').inner_text()
    assert "done" in row and str(answer.usage.completion_tokens) in row
    hold = ledger_page.locator(f'#entries tr[data-cause="{answer.id}"].memo-hold')
    assert hold.count() == 1  # the escrow before the work, then the settlement
    for page, at in loaded.items():
        assert page.evaluate("window.idlegridLoadedAt") == at, "the page was reloaded"
    print(f"live update lag after the completion returned: {lag_s:.3f} s")

    # Energy was reported, and an estimate is marked as one.
    served = grid_page.locator("#providers tr.live sup.est")
    served.first.wait_for(timeout=10_000)
    grid_page.wait_for_function(
        "() => document.querySelectorAll('#chart-throughput canvas').length > 0"
    )
    shot(grid_page, "grid")
    shot(ledger_page, "ledger")

    for name, selector in (
        ("requests", f'#recent tr[data-request="{answer.id}"]'),
        ("market", "#offers tbody tr"),
    ):
        page = context.new_page()
        page.goto(f"{url}/{name}")
        page.wait_for_selector(selector, timeout=10_000)
        if name == "market":
            assert page.locator("#offers tbody tr").count() == 2
            assert MODEL in page.locator("#prices").inner_text()
        else:
            assert page.locator("#reqstats").inner_text().count("s") > 0
            assert "—" not in page.locator("#reqstats .card").nth(1).inner_text()  # p50 known
        shot(page, name)
    # Audits waiting for a verifier say so (these fake providers have none).
    providers = grid_page.locator("#providers").inner_text()
    assert "no verifier for fake" in providers and "honest" in providers, providers
    context.close()
    # Every page fits a desktop window and a phone without scrolling sideways (a wide
    # table scrolls in its own box); screenshots of both are the artifacts.
    for width, height, tag in ((1440, 900, "1440"), (1280, 800, "1280"), (390, 844, "phone")):
        ctx = browser.new_context(viewport={"width": width, "height": height})
        ctx.add_cookies(context_cookies)
        for name in ("", "requests", "market", "ledger"):
            page = ctx.new_page()
            page.goto(f"{url}/{name}")
            page.wait_for_selector("#live.on", timeout=10_000)
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"/{name} at {width} px is {overflow} px too wide"
            if width != 1280:
                shot(page, f"{name or 'grid'}-{tag}")
            page.close()
        ctx.close()
