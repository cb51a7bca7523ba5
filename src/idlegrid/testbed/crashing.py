"""Engines that die by a signal while loading, as a mis-built native engine does.

`IllegalInstruction` raises SIGILL in its own process, exactly what a llama.cpp wheel built
for AMX does on a VM that has not enabled the tile state; tests use it to check that the
agent's start-up check and `idlegrid up` name the cause instead of "exited (-4)".
"""

from __future__ import annotations

import os
import signal
from typing import Any


class IllegalInstruction:
    """Dies with SIGILL on load."""

    name = "crashing"

    def __init__(self, model_id: str, **_: Any) -> None:
        os.kill(os.getpid(), signal.SIGILL)


class OutOfMemory:
    """Dies with SIGKILL on load, as the kernel's OOM killer ends a process."""

    name = "crashing"

    def __init__(self, model_id: str, **_: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
