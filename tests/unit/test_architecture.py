"""Architecture rules that live in tooling: the core stays pure, `import idlegrid` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import idlegrid

SRC = Path(idlegrid.__file__).parent
FORBIDDEN_IN_CORE = {"fastapi", "starlette", "sqlalchemy", "httpx", "torch", "llama_cpp",
                     "uvicorn", "alembic", "requests", "transformers", "vllm", "ray"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
            if node.module.startswith("idlegrid.") and not node.module.startswith(
                    ("idlegrid.core", "idlegrid.errors")):
                roots.add(node.module)
    return roots


def test_core_imports_no_framework_database_network_or_torch() -> None:
    offenders = {}
    for path in (SRC / "core").rglob("*.py"):
        bad = {r for r in imported_roots(path)
               if r in FORBIDDEN_IN_CORE or r.startswith("idlegrid.")}
        if bad:
            offenders[str(path.relative_to(SRC))] = sorted(bad)
    assert offenders == {}


def test_cli_help_loads_no_heavy_modules() -> None:
    code = ("import sys; from idlegrid.client.cli import app; "
            "heavy = [m for m in ('torch', 'llama_cpp', 'transformers', 'vllm', 'ray') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_agent_roles_never_import_the_agent_and_agent_modules_stay_small() -> None:
    agent_dir = SRC / "agent"
    offenders = {}
    for path in (agent_dir / "roles").rglob("*.py"):
        package = "idlegrid." + ".".join(path.parent.relative_to(SRC).parts)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):  # TYPE_CHECKING blocks too
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against the module's package
                    up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{up}.{base}" if base else up
                names |= {base} | {f"{base}.{a.name}" for a in node.names}
        bad = {n for n in names if n == "idlegrid.agent.agent"
               or n.startswith("idlegrid.agent.agent.")}
        if bad:
            offenders[str(path.relative_to(SRC))] = sorted(bad)
    assert offenders == {}
    too_long = {str(p.relative_to(SRC)): n for p in agent_dir.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > 600}
    assert too_long == {}
