"""The CLI fits its ecosystem: --version, one-line expected errors, grouped sub-apps with
the old names kept, tables that never cut an id, settings from IDLEGRID_ variables."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from rich.table import Table
from typer.testing import CliRunner

from idlegrid import __version__
from idlegrid.client.cli import app
from idlegrid.client.output import show
from idlegrid.config import CoordinatorSettings, default_data_dir
from idlegrid.testbed.inprocess import free_port

runner = CliRunner()


def test_version_prints_and_exits_zero() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == __version__


@pytest.mark.parametrize(
    "args",
    [["status"], ["balance"], ["complete", "hi"], ["earnings"], ["market", "offers"]],
)
def test_an_unreachable_coordinator_is_one_red_line_and_exit_1(
    args: list[str], tmp_path: Path
) -> None:
    res = runner.invoke(
        app, [*args, "--coordinator", "http://127.0.0.1:1", "--data-dir", str(tmp_path)]
    )
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert "cannot reach the coordinator at http://127.0.0.1:1" in " ".join(lines)
    assert "Traceback" not in res.output


def test_help_groups_commands_and_hides_the_old_flat_names() -> None:
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0
    assert "--install-completion" in res.stdout  # shell completion (bash, zsh, fish, pwsh)
    for group in ("keys", "market", "trust", "ledger", "train", "Run", "Use", "Provider"):
        assert group in res.stdout
    for old in ("offers", "verify-ledger", "explain"):
        assert f" {old} " not in res.stdout
    # The old names still run (hidden aliases): they reach the (absent) grid like the new.
    for old, new in ((["offers"], ["market", "offers"]), (["verify-ledger"], ["ledger", "verify"])):
        a = runner.invoke(app, [*old, "--coordinator", "http://127.0.0.1:1"])
        b = runner.invoke(app, [*new, "--coordinator", "http://127.0.0.1:1"])
        assert a.exit_code == b.exit_code == 1 and a.output == b.output


def test_a_piped_table_is_printed_whole_at_any_width() -> None:
    from rich.console import Console

    ids = [f"provider-{i}-" + "f" * 40 for i in range(3)]
    t = Table(title="wide")
    for col in ("node", "state", "hardware", "earned", "more", "columns", "here"):
        t.add_column(col)
    for i in ids:
        t.add_row(i, "live", "Intel(R) Xeon(R) CPU @ 2.20GHz, 2 cores", "15.000000", "x", "y", "z")
    for width in (40, 80):
        console = Console(file=(buf := __import__("io").StringIO()), width=width)
        show(t, console)
        text = buf.getvalue()
        assert "…" not in text
        for i in ids:
            assert i in text  # grep finds the whole id on one line


def test_every_setting_reads_its_env_twin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IDLEGRID_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("IDLEGRID_PORT", "9999")
    monkeypatch.setenv("IDLEGRID_FEE_BPS", "500")
    assert default_data_dir() == tmp_path
    s = CoordinatorSettings()
    assert (s.data_dir, s.port, s.fee_bps) == (tmp_path, 9999, 500)


def test_the_coordinator_command_listens_where_the_environment_says(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "IDLEGRID_PORT": str(port),
        "IDLEGRID_HOST": "127.0.0.1",
        "IDLEGRID_DATA_DIR": str(tmp_path / "grid"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "idlegrid", "coordinator"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        tick, up = threading.Event(), False
        for _ in range(600):  # poll with a deadline: start-up runs the migrations
            try:
                with httpx.Client(trust_env=False, timeout=2) as c:
                    up = c.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.TransportError:
                pass
            if up or proc.poll() is not None:
                break
            tick.wait(0.1)
        assert up, proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
        assert (tmp_path / "grid" / "coordinator.db").exists()
        assert (tmp_path / "grid" / "operator-key").exists()
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr:
            proc.stderr.close()
