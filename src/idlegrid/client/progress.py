"""Rich progress bars for long CLI operations that stay out of `--json` and non-TTY output."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(console: Console, *, quiet: bool = False) -> Progress:
    """A progress display on `console` (stderr): bar, count, rate, elapsed time and ETA.

    Disabled when `quiet` (e.g. --json) or when the console is not a terminal, so piped and
    machine-read output never carries control codes or half-drawn bars.
    """
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
