"""The `idlegrid` command line (Typer + Rich). Heavy imports happen inside commands.

Commands live in `*_cmd.py` modules beside this one; this file only wires them: the
everyday commands at the top level under help panels, each domain a sub-app
(`idlegrid keys …`, `idlegrid market …`), and the old flat names as hidden aliases for
one release. Adding a sub-app is one line in the block marked "Sub-apps".
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from idlegrid import __version__
from idlegrid.client import grid_cmd, serve_cmd
from idlegrid.client.batch_cmd import batch_app
from idlegrid.client.dispute_cmd import dispute
from idlegrid.client.earnings_cmd import earnings, estimate
from idlegrid.client.keys_cmd import keys_app
from idlegrid.client.lease_cmd import cp, exec_cmd, lease_app, port_forward, shell_cmd
from idlegrid.client.market_cmd import balance, market_app, market_commands
from idlegrid.client.output import GuardedGroup
from idlegrid.client.train_cmd import train_aliases, train_app

app = typer.Typer(
    cls=GuardedGroup,
    help="idlegrid: turn idle GPUs into a verifiable AI compute grid.",
    no_args_is_help=True,
    # Expected failures are one line (output.GuardedGroup); a bug's traceback stays plain.
    pretty_exceptions_enable=False,
)
out = Console()
EXIT_ENGINE_CRASHED = serve_cmd.EXIT_ENGINE_CRASHED


def _print_version(value: bool) -> None:
    if value:
        out.print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    # The database, its WAL, logs and keys hold balances and secrets: owner-only files.
    os.umask(0o077)


RUN, USE, PROVIDER = "Run", "Use", "Provider"

# ---- top-level commands -------------------------------------------------------------
app.command(rich_help_panel=RUN)(serve_cmd.up)
app.command(rich_help_panel=RUN)(serve_cmd.coordinator)
app.command(rich_help_panel=RUN)(serve_cmd.provide)
app.command(rich_help_panel=USE)(grid_cmd.complete)
app.command(rich_help_panel=USE)(grid_cmd.status)
app.command(rich_help_panel=USE)(balance)
app.command(rich_help_panel=PROVIDER)(earnings)
app.command(rich_help_panel=PROVIDER)(estimate)

# ---- Sub-apps: one line each ----------------------------------------------------------
app.add_typer(keys_app, name="keys", help="Consumer API keys (operator).")
app.add_typer(market_app, name="market", help="Offers, orders and why an order was placed.")
app.add_typer(grid_cmd.trust_app, name="trust", help="Audits and disputes.")
app.add_typer(grid_cmd.ledger_app, name="ledger", help="The ledger: verify the hash chain.")
app.add_typer(lease_app, name="lease", help="Leased workspaces on providers.")
app.add_typer(batch_app, name="batch", help="OpenAI batches: a JSONL file in, answers out.")
app.add_typer(
    train_app,
    name="train",
    help="Verified training jobs: run, jobs, show, cancel, plan (`train [OPTIONS]` alone: run).",
)

# ---- old flat names, kept hidden for one release ---------------------------------------
for _name, _fn in market_commands.items():
    if _name != "balance":
        app.command(_name, hidden=True)(_fn)
app.command("dispute", hidden=True)(dispute)
app.command("verify-ledger", hidden=True)(grid_cmd.verify_ledger)
for _name, _fn in train_aliases.items():
    app.command(_name, hidden=True)(_fn)

LEASES = "Leases"
app.command("exec", context_settings={"allow_interspersed_args": False}, rich_help_panel=LEASES)(
    exec_cmd
)
app.command("cp", rich_help_panel=LEASES)(cp)
app.command("port-forward", rich_help_panel=LEASES)(port_forward)
app.command("shell", rich_help_panel=LEASES)(shell_cmd)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
