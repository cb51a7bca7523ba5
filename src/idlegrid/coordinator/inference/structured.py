"""Structured outputs at the gateway: `response_format` to the work payload's grammar, and
which providers may serve a constrained request (those whose engine names a grammar engine).

Never served unconstrained: a schema the grammar engine cannot enforce is a 400 naming
`response_format` here, or from the provider's compile (`grammar_failure`).
"""

from __future__ import annotations

from typing import Any

from idlegrid.coordinator.views import NodeView
from idlegrid.core.grammar import PARAM, from_response_format
from idlegrid.core.ledger import Price
from idlegrid.core.routing import Candidate
from idlegrid.errors import InvalidRequest, NoCapacity


def grammar_payload(response_format: Any) -> dict[str, str] | None:
    """The payload's `grammar` for a request's response_format (None: plain text)."""
    spec = from_response_format(response_format)
    if spec is None:
        return None
    from idlegrid.engines.grammar import check  # lazy: llguidance only where installed

    check(spec)
    return spec.to_wire()


def can_constrain(node: NodeView | None) -> bool:
    """Whether a node's engine enforces grammars (its engine facts name one)."""
    return bool(node is not None and node.engine.get("grammar"))


def constrained(
    model: str,
    nodes: dict[str, NodeView],
    cands: list[Candidate],
    prices: dict[str, Price],
) -> tuple[list[Candidate], dict[str, Price]]:
    """Candidates that can enforce a grammar; NoCapacity if none can."""
    ok = {n for n in prices if can_constrain(nodes.get(n))}
    if not ok:
        raise NoCapacity(model, "no live provider of it can enforce response_format")
    return [c for c in cands if c.node_id in ok], {n: p for n, p in prices.items() if n in ok}


def invalid_failure(reason: str) -> InvalidRequest:
    """The 400 for a request a provider found invalid; `param: message` names the field."""
    param, _, message = reason.partition(": ")
    if param == PARAM and message:
        return InvalidRequest(message, param=PARAM)
    return InvalidRequest(reason, param="prompt")
