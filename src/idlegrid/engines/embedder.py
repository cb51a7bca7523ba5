"""The embedding capability: engines that turn token ids into one vector per input.

An embedding engine also implements `Engine` (so the agent's slots, locks, registration and
verifier mode carry it unchanged) but cannot generate. It advertises itself at registration
through `describe()["embedding"]` (dimensions, the most tokens an input may have, vocabulary
size); the coordinator routes `/v1/embeddings` only to models advertised that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from idlegrid.errors import InvalidRequest


@runtime_checkable
class Embedder(Protocol):
    """A loaded embedding model. Not thread-safe: one request at a time."""

    name: str
    model_id: str

    @property
    def dimensions(self) -> int:
        """Length of each vector."""
        ...

    @property
    def max_input_tokens(self) -> int:
        """Most tokens one input may have (special tokens included)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1."""
        ...

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text` with the model's special tokens (e.g. [CLS] ... [SEP])."""
        ...

    def embed(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        """One float32 vector per input, [len(inputs), dimensions]."""
        ...

    def det_class(self) -> str:
        """engine/version/dtype/device/t<threads>: who may audit whom."""
        ...

    def describe(self) -> dict[str, Any]:
        """Engine facts, with an `embedding` entry that advertises the capability."""
        ...


def is_embedder(engine: Any) -> bool:
    """Whether `engine` embeds (and, by the grid's rules, serves only embeddings)."""
    return isinstance(engine, Embedder) and "embedding" in engine.describe()


def embedding_facts(dimensions: int, max_input_tokens: int, vocab_size: int) -> dict[str, int]:
    """The `describe()["embedding"]` entry a provider registers with."""
    return {"dimensions": dimensions, "max_input_tokens": max_input_tokens, "vocab": vocab_size}


def input_ids(engine: Embedder, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Each input's token ids (text is tokenized; ids are taken as given), checked against
    the model's limits: a 400 naming `input` for an empty, overlong or out-of-range one."""
    out: list[list[int]] = []
    for i, item in enumerate(inputs):
        ids = engine.tokenize(item) if isinstance(item, str) else [int(t) for t in item]
        if not ids:
            raise InvalidRequest(f"input[{i}] is empty", param="input")
        if len(ids) > engine.max_input_tokens:
            raise InvalidRequest(
                f"input[{i}] has {len(ids)} tokens; {engine.model_id} takes at most "
                f"{engine.max_input_tokens} per input",
                param="input",
            )
        if min(ids) < 0 or max(ids) >= engine.vocab_size:
            raise InvalidRequest(f"input[{i}] holds a token id out of range", param="input")
        out.append(ids)
    return out
