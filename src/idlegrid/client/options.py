"""Command-line options every client command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idlegrid.config import default_data_dir

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        help="Grid data directory.",
        default_factory=default_data_dir,
        show_default=False,
    ),
]
CoordinatorUrl = Annotated[
    str | None,
    typer.Option("--coordinator", help="Coordinator URL (default: the local grid in --data-dir)."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
