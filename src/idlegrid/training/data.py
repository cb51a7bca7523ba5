"""Training text that every CPython install ships: a fixed list of stdlib modules, as bytes."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

# Present in CPython 3.11+; the exact bytes differ between versions, so compare runs made
# on one interpreter, not numbers across interpreters.
STDLIB_MODULES = (
    "textwrap.py",
    "string.py",
    "functools.py",
    "heapq.py",
    "bisect.py",
    "contextlib.py",
    "dataclasses.py",
    "enum.py",
    "fractions.py",
    "shlex.py",
    "json/decoder.py",
    "json/encoder.py",
    "collections/__init__.py",
    "random.py",
    "statistics.py",
    "glob.py",
    "fnmatch.py",
    "copy.py",
    "abc.py",
    "operator.py",
    "queue.py",
    "sched.py",
    "calendar.py",
)


def load_corpus(max_bytes: int = 600_000) -> bytes:
    """The concatenated stdlib modules, at most max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = [(root / name).read_bytes() for name in STDLIB_MODULES if (root / name).exists()]
    data = b"\n".join(chunks)
    if len(data) < 50_000:
        raise RuntimeError(f"stdlib sources under {root} look missing ({len(data)} bytes)")
    return data[:max_bytes]


@dataclass(frozen=True)
class Windows:
    """Fixed training and evaluation windows (seq+1 bytes each); a window's row is its id."""

    train: torch.Tensor  # (n_train, seq + 1) int64
    eval: torch.Tensor  # (n_eval, seq + 1) int64


def make_windows(corpus: bytes, seq: int, n_train: int, n_eval: int) -> Windows:
    """Evenly spaced windows: training from the first 85 %, evaluation from the rest."""
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(torch.int64)
    split = int(len(data) * 0.85)

    def take(lo: int, hi: int, n: int) -> torch.Tensor:
        starts = torch.linspace(lo, hi - seq - 2, n).to(torch.int64)
        return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])

    return Windows(take(0, split, n_train), take(split, len(data), n_eval))
