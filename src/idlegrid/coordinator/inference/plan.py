"""What one request asks of the grid, judged before anything is escrowed: its tasks'
payloads, its price cap, and how to shape the answer (the same for a request sent now and
a batch line, inference/lines.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from idlegrid.core.ledger import MICRO, Price


def price_cap(st: Any, body: Any) -> Price:
    """The most a request may pay per token: its `max_price`, or the grid's default."""
    cap = body.max_price
    prompt, output = (
        (cap.prompt, cap.output)
        if cap is not None
        else (st.default_max_prompt_price, st.default_max_output_price)
    )
    return Price(round(prompt * MICRO), round(output * MICRO))


@dataclass(frozen=True)
class Plan:
    """What one request asks of the grid: its tasks' payloads and how to shape the answer
    (the same for a request sent now and a batch line, inference/lines.py)."""

    kind: str
    model: str
    work: list[tuple[dict[str, Any], int]]  # (payload, prompt-token bound) per choice
    max_tokens: int
    stream: bool
    include_usage: bool
    cap: Price
    logprobs: bool = False
    calls: bool = False
    echo: list[str] | None = None  # completions with echo: each choice's prompt
    encoding: str | None = None  # embeddings: "float" or "base64"
