"""`idlegrid up` on a data dir that held a grid on another port: the CLI finds the new one."""

from __future__ import annotations

from pathlib import Path

import httpx

from idlegrid.client.localgrid import GRID_FILE, LocalGrid, find_grid
from idlegrid.testbed.inprocess import free_port


def test_a_reused_data_dir_points_the_cli_at_the_grid_on_its_new_port(tmp_path: Path) -> None:
    """The grid file used to be written only with a new consumer key, so a second `up` on
    another port left the CLI dialling the old one (found in the tenth session's smoke)."""
    (tmp_path / GRID_FILE).write_text('{"url": "http://127.0.0.1:1"}')
    grid = LocalGrid(data_dir=tmp_path, port=free_port(), providers=0, engine="fake", model="x")
    try:
        grid.start_coordinator()
        url, _ = find_grid(None, tmp_path)
        assert url == grid.url
        with httpx.Client(trust_env=False, timeout=10) as c:
            assert c.get(f"{url}/api/v1/status").status_code == 200
    finally:
        grid.stop()
