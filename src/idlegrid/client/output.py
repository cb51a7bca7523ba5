"""How the CLI prints: tables that never cut a value, and expected errors as one line.

Rich cuts cells to `provi…` when a table is wider than the terminal, and a pipe counts
as an 80-column terminal: ids could then be neither copied nor grepped. Tables here fold
in a terminal and are printed at their full width when piped. Expected failures (the
coordinator is unreachable, the API answered 4xx, a typed idlegrid error) end a command
with one red line and exit code 1 instead of a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup
from typer.exceptions import TyperException

from idlegrid.errors import IdlegridError

EXIT_EXPECTED = 1


def show(table: Table, console: Console | None = None) -> None:
    """Print `table` without cutting any cell: folded in a terminal, full width in a pipe."""
    for column in table.columns:
        column.overflow = "fold"
    out = console or Console()
    if not out.is_terminal:
        natural = out.measure(table, options=out.options.update_width(1_000_000)).maximum
        out = Console(file=out.file, width=max(out.width, natural), no_color=True, highlight=False)
    out.print(table)


def _transport_error(exc: BaseException) -> bool:
    httpx = sys.modules.get("httpx")  # never imported just to ask
    return httpx is not None and isinstance(exc, httpx.TransportError)


def expected_message(exc: BaseException) -> str | None:
    """The one line an expected failure deserves; None for a bug (keep its traceback)."""
    if _transport_error(exc):
        request = getattr(exc, "_request", None)
        where = f" at {request.url.scheme}://{request.url.netloc.decode()}" if request else ""
        return (
            f"cannot reach the coordinator{where} ({exc or type(exc).__name__}); is it "
            "running? (`idlegrid up` starts a local grid)"
        )
    if isinstance(exc, IdlegridError):
        data: dict[str, Any] = exc.data
        body = data.get("body") or {}
        param = body.get("param") or data.get("param")
        message = exc.message + (f" (field: {param})" if param else "")
        if data.get("status") == 401:
            message += "; set IDLEGRID_API_KEY, or ask the operator for a key (idlegrid keys)"
        return message
    return None


class GuardedGroup(TyperGroup):
    """A command group that turns expected failures into one red line and exit 1."""

    def invoke(self, ctx: Any) -> Any:
        """Run the command; report an expected failure briefly."""
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # Typer's own: usage, exit codes
            raise
        except Exception as exc:
            message = expected_message(exc)
            if message is None:
                raise
            # soft_wrap: one line however narrow the terminal, so it greps whole.
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                f"[bold red]error:[/] {message}"
            )
            raise typer.Exit(EXIT_EXPECTED) from None


class DefaultCommandGroup(TyperGroup):
    """A sub-app whose bare form runs one of its commands: `idlegrid train --steps 8` is
    `idlegrid train run --steps 8`, so the form that predates the sub-app keeps working."""

    default_command = "run"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Put the default command in front when no command is named (help stays help)."""
        # Completion parses resiliently: left alone it lists the sub-app's commands.
        first = args[0] if args else "-"
        if (
            not ctx.resilient_parsing
            and first.startswith("-")
            and first not in ctx.help_option_names
        ):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)
