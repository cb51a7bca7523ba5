"""`idlegrid train` is a sub-app (run, jobs, show, cancel, plan) and every form that predates
it still resolves to the same command: `train [OPTIONS]` alone, `jobs`, `job`, `cancel-job`,
`plan`. Commands that print a table all take `--json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from idlegrid.client import train_cmd
from idlegrid.client.cli import app
from idlegrid.client.plan_cmd import plan

runner = CliRunner()
UNREACHABLE = ["--coordinator", "http://127.0.0.1:1"]


def _function(*path: str) -> Any:
    """The Python function a command path names, looked up the way Click looks it up."""
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("idlegrid", ["--help"], resilient_parsing=True)
    for name in path:
        assert hasattr(command, "commands"), path  # a group (Typer vendors its own Click)
        found = command.get_command(ctx, name)
        assert found is not None, f"no command {path}"
        command, ctx = found, found.make_context(name, [], parent=ctx, resilient_parsing=True)
    assert command.callback is not None
    return command.callback.__wrapped__  # Typer wraps each function with update_wrapper


@pytest.mark.parametrize(
    ("new", "old", "function"),
    [
        (("train", "run"), None, train_cmd.train),
        (("train", "jobs"), ("jobs",), train_cmd.jobs),
        (("train", "show"), ("job",), train_cmd.job),
        (("train", "cancel"), ("cancel-job",), train_cmd.cancel_job),
        (("train", "plan"), ("plan",), plan),
    ],
)
def test_each_new_form_and_its_old_alias_name_the_same_function(
    new: tuple[str, ...], old: tuple[str, ...] | None, function: Any
) -> None:
    assert _function(*new) is function
    if old is not None:
        assert _function(*old) is function


def _body(help_text: str) -> str:
    """Help without its usage line, which names the path it was reached by."""
    return "\n".join(line for line in help_text.splitlines() if "Usage:" not in line)


@pytest.mark.parametrize(
    ("new", "old"),
    [
        (["train", "jobs"], ["jobs"]),
        (["train", "show"], ["job"]),
        (["train", "cancel"], ["cancel-job"]),
        (["train", "plan"], ["plan"]),
    ],
)
def test_an_old_name_prints_the_help_of_its_new_form(new: list[str], old: list[str]) -> None:
    a = runner.invoke(app, [*old, "--help"], env={"COLUMNS": "120"}, prog_name="idlegrid")
    b = runner.invoke(app, [*new, "--help"], env={"COLUMNS": "120"}, prog_name="idlegrid")
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert f"idlegrid {' '.join(new)} [OPTIONS]" in b.stdout
    assert _body(a.stdout) == _body(b.stdout)


def test_train_with_options_and_no_command_is_train_run() -> None:
    bare = runner.invoke(
        app, ["train", "--steps", "8", "--help"], env={"COLUMNS": "120"}, prog_name="idlegrid"
    )
    run = runner.invoke(
        app, ["train", "run", "--help"], env={"COLUMNS": "120"}, prog_name="idlegrid"
    )
    assert bare.exit_code == run.exit_code == 0
    assert "Usage: idlegrid train run [OPTIONS]" in bare.stdout
    assert bare.stdout == run.stdout
    # `train --help` alone is the sub-app's help, listing its commands.
    group = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "120"}, prog_name="idlegrid")
    assert group.exit_code == 0 and "Usage: idlegrid train [OPTIONS] COMMAND" in group.stdout
    for name in ("run", "jobs", "show", "cancel", "plan"):
        assert f" {name} " in group.stdout


@pytest.mark.parametrize("args", [["train"], ["train", "--steps", "8"], ["train", "run"]])
def test_a_bare_train_runs_a_job_as_it_did(args: list[str], tmp_path: Path) -> None:
    """No command: today's `idlegrid train` ran a job; it reaches for the grid, not help."""
    res = runner.invoke(app, [*args, *UNREACHABLE, "--data-dir", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert "cannot reach the coordinator at http://127.0.0.1:1" in res.output


def test_top_level_help_shows_the_sub_app_and_hides_the_flat_training_names() -> None:
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "120"}, prog_name="idlegrid")
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert any(line.split()[1:2] == ["train"] for line in lines if line.startswith("│"))
    for old in ("jobs", "job", "cancel-job", "plan"):
        assert not any(line.split()[1:2] == [old] for line in lines if line.startswith("│"))


def _leaves(command: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if hasattr(command, "commands"):
        found: dict[tuple[str, ...], Any] = {}
        for name, sub in command.commands.items():
            if not sub.hidden:
                found |= _leaves(sub, (*path, name))
        return found
    return {path: command}


# Commands that print a table (or a record a script wants) in their plain form.
TABLE_COMMANDS = [
    ("status",),
    ("balance",),
    ("earnings",),
    ("estimate",),
    ("market", "offers"),
    ("market", "orders"),
    ("market", "order"),
    ("market", "explain"),
    ("market", "cancel"),
    ("ledger", "verify"),
    ("lease", "status"),
    ("batch", "submit"),
    ("batch", "list"),
    ("batch", "status"),
    ("batch", "results"),
    ("batch", "cancel"),
    ("train", "run"),
    ("train", "jobs"),
    ("train", "show"),
    ("train", "cancel"),
    ("train", "plan"),
    ("keys", "create"),
    ("keys", "list"),
    ("keys", "limit"),
    ("keys", "revoke"),
    ("keys", "fund"),
    ("complete",),
]


def test_every_command_that_prints_a_table_takes_json() -> None:
    leaves = _leaves(typer.main.get_command(app))
    for path in TABLE_COMMANDS:
        assert path in leaves, path
        flags = {opt for p in leaves[path].params for opt in getattr(p, "opts", [])}
        assert "--json" in flags, path
