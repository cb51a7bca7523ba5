"""Architecture rules that live in tooling: the core stays pure, `import idlegrid` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import idlegrid

SRC = Path(idlegrid.__file__).parent
FORBIDDEN_IN_CORE = {
    "fastapi",
    "starlette",
    "sqlalchemy",
    "httpx",
    "torch",
    "llama_cpp",
    "uvicorn",
    "alembic",
    "requests",
    "transformers",
    "vllm",
    "ray",
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
            if node.module.startswith("idlegrid.") and not node.module.startswith(
                ("idlegrid.core", "idlegrid.errors")
            ):
                roots.add(node.module)
    return roots


def test_core_imports_no_framework_database_network_or_torch() -> None:
    offenders = {}
    for path in (SRC / "core").rglob("*.py"):
        bad = {
            r for r in imported_roots(path) if r in FORBIDDEN_IN_CORE or r.startswith("idlegrid.")
        }
        if bad:
            offenders[str(path.relative_to(SRC))] = sorted(bad)
    assert offenders == {}


def test_cli_help_loads_no_heavy_modules() -> None:
    code = (
        "import sys; from idlegrid.client.cli import app; "
        "heavy = [m for m in ('torch', 'llama_cpp', 'transformers', 'vllm', 'ray') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
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
        bad = {
            n for n in names if n == "idlegrid.agent.agent" or n.startswith("idlegrid.agent.agent.")
        }
        if bad:
            offenders[str(path.relative_to(SRC))] = sorted(bad)
    assert offenders == {}
    too_long = {
        str(p.relative_to(SRC)): n
        for p in agent_dir.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert too_long == {}


# ---- the coordinator's rooms ----------------------------------------------------------------


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """Modules (and module.name) imported when the module runs: everything but what an
    `if TYPE_CHECKING:` block imports, function-level imports included."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


MODULES = {_module(p): p for p in SRC.rglob("*.py")}
GRAPH = {m: {i for i in _runtime_imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
DOMAINS = ("nodes", "inference", "market", "trust", "training", "dashboard", "files")


def _domain(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 4 and parts[1] == "coordinator" and parts[2] in DOMAINS:
        return parts[2]
    return None


def test_no_import_cycle_between_modules_at_run_time() -> None:
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert cycles == []


def test_a_domain_uses_only_tables_and_schemas_of_another() -> None:
    """A domain never imports another domain's service, store or routes: what it needs of
    another it gets injected (app.py) or hears as an event (events.py)."""
    offenders = sorted(
        f"{m} -> {i}"
        for m, deps in GRAPH.items()
        if (d := _domain(m))
        for i in deps
        if (e := _domain(i)) and e != d and i.split(".")[3] not in ("tables", "schemas")
    )
    assert offenders == []


def test_routes_never_import_the_database_layer() -> None:
    offenders = sorted(
        f"{m} -> {i}"
        for m, deps in GRAPH.items()
        if m.startswith("idlegrid.coordinator.") and m.rsplit(".", 1)[1].endswith("routes")
        for i in deps
        if i.startswith("idlegrid.coordinator.db")
        or i.rsplit(".", 1)[-1] in ("tables", "store")
        or ".tables." in i
        or ".store." in i
    )
    assert offenders == []


def test_no_module_over_600_lines() -> None:
    too_long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert too_long == {}
