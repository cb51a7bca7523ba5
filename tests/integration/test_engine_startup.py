"""An engine that dies by a signal is reported with its cause, by the agent and by `up`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from idlegrid.engines.startup import check_engine
from idlegrid.errors import EngineCrashed, EngineError
from idlegrid.testbed.inprocess import free_port

SIGILL_ENGINE = "idlegrid.testbed.crashing:IllegalInstruction"


def test_a_sigill_is_named_with_engine_model_and_fix() -> None:
    with pytest.raises(EngineCrashed) as err:
        check_engine(SIGILL_ENGINE, "gemma3:270m")
    e = err.value
    assert e.data["signal"] == "SIGILL" and e.data["model"] == "gemma3:270m"
    assert SIGILL_ENGINE in e.message and "scripts/bootstrap" in e.message


def test_an_oom_kill_is_named_as_one() -> None:
    with pytest.raises(EngineCrashed) as err:
        check_engine("idlegrid.testbed.crashing:OutOfMemory", "m")
    assert err.value.data["signal"] == "SIGKILL" and "OOM" in err.value.message


def test_a_load_error_is_an_engine_error_with_its_message() -> None:
    with pytest.raises(EngineError, match="cannot import engine module") as err:
        check_engine("no_such_module:Engine", "m")
    assert not isinstance(err.value, EngineCrashed)


def test_a_working_engine_decodes_its_probe_tokens() -> None:
    report = check_engine("fake", "fake")
    assert report["engine"] == "fake" and len(report["tokens"]) == 4


def test_provide_exits_with_the_cause(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "idlegrid",
            "provide",
            "--engine",
            SIGILL_ENGINE,
            "--coordinator",
            f"http://127.0.0.1:{free_port()}",
            "--key-file",
            str(tmp_path / "k"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 3, proc.stderr
    assert "SIGILL" in proc.stderr and "gemma3:270m" in proc.stderr


def test_up_names_the_provider_and_shows_its_log(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "idlegrid",
            "up",
            "--data-dir",
            str(tmp_path),
            "--port",
            str(free_port()),
            "--providers",
            "1",
            "--engine",
            SIGILL_ENGINE,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "provider-0 exited with status 3" in proc.stderr, proc.stderr
    assert "SIGILL" in proc.stderr  # from the provider's own log, shown by `up`
    assert "idlegrid is up" not in proc.stdout
    # What the grid wrote holds balances and secrets: nobody else may read it.
    written = [
        *tmp_path.glob("coordinator.db*"),
        *tmp_path.glob("logs/*.log"),
        tmp_path / "operator-key",
    ]
    assert any(p.name == "coordinator.db" for p in written)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o600"}
