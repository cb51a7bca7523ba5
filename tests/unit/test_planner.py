"""`idlegrid plan` end to end in-process, the purity rule, and examples kept in sync."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from idlegrid.client.plan_cmd import plan
from idlegrid.core.planner import parse_topology
from idlegrid.core.planner.scenarios import SCENARIOS, tiny

ROOT = Path(__file__).resolve().parents[2]
PLANNER = ROOT / "src" / "idlegrid" / "core" / "planner"
EXAMPLES = ROOT / "examples" / "topologies"
FORBIDDEN = {
    "torch",
    "fastapi",
    "sqlalchemy",
    "httpx",
    "scipy",
    "time",
    "random",
    "os",
    "socket",
    "subprocess",
    "pathlib",
}


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("plan")(plan)
    app.command("noop")(lambda: None)  # two commands, so `plan` stays a sub-command
    return app


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(raw))
    return path


def test_plan_json(app: typer.Typer, tmp_path: Path) -> None:
    path = _write(tmp_path, tiny())
    res = CliRunner().invoke(app, ["plan", str(path), "--seconds", "0.3", "--seed", "4", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert len(doc["stages"]) == 4 and all(len(s) == 2 for s in doc["stages"])
    assert len(doc["pipelines"]) == 2 and all(len(p) == 4 for p in doc["pipelines"])
    assert sorted(v for s in doc["stages"] for v in s) == list(range(8))
    # pipelines are the stage lists read column-wise
    assert doc["pipelines"] == [list(c) for c in zip(*doc["stages"], strict=True)]
    for mode in ("dtfm", "full"):
        assert doc["cost"][mode]["total"] > 0
        for name in ("random", "region_contiguous", "strided"):
            assert doc["baselines"][name][mode]["total"] > 0
    assert doc["cost"]["full"]["total"] <= doc["baselines"]["region_contiguous"]["full"]["total"]
    assert doc["seed"] == 4 and doc["seconds"] >= 0


def test_plan_table(app: typer.Typer, tmp_path: Path) -> None:
    path = _write(tmp_path, tiny())
    res = CliRunner().invoke(app, ["plan", str(path), "--seconds", "0.2"])
    assert res.exit_code == 0, res.output
    for word in ("Stages", "Pipelines", "gpu04", "planner", "region-contiguous", "strided"):
        assert word in res.stdout


def test_invalid_topology_exits_2_naming_the_field(app: typer.Typer, tmp_path: Path) -> None:
    raw = tiny()
    raw["bandwidth_gbps"][2][6] = -1
    res = CliRunner().invoke(app, ["plan", str(_write(tmp_path, raw)), "--json"])
    assert res.exit_code == 2
    assert "bandwidth_gbps[2][6]" in res.output and "negative" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("content", ["{not json", ""])
def test_not_json_exits_2(app: typer.Typer, tmp_path: Path, content: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    res = CliRunner().invoke(app, ["plan", str(path)])
    assert res.exit_code == 2 and "not JSON" in res.output


def test_missing_file_exits_2(app: typer.Typer, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "nope.json")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_planner_core_imports_nothing_impure() -> None:
    for path in PLANNER.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_planner_and_cli_loads_no_torch() -> None:
    code = (
        "import sys, idlegrid.core.planner, idlegrid.client.plan_cmd; "
        "bad = [m for m in ('torch', 'scipy', 'fastapi', 'sqlalchemy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src")}
    )


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_examples_match_generators(name: str) -> None:
    path = EXAMPLES / f"{name}.json"
    assert path.exists(), "regenerate: python bench/bench_planner.py --write-examples ..."
    assert parse_topology(json.loads(path.read_text())) == parse_topology(SCENARIOS[name]())
