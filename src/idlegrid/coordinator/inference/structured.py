"""Structured outputs at the gateway: which providers may serve a constrained request (those
whose engine names a grammar engine); the payload's grammar is made by tools.prepare.

Never served unconstrained: a schema the grammar engine cannot enforce is a 400 naming
`response_format` here, or from the provider's compile (`grammar_failure`).
"""

from __future__ import annotations

from idlegrid.coordinator.views import NodeView
from idlegrid.core.grammar import PARAM
from idlegrid.core.ledger import Price
from idlegrid.core.routing import Candidate
from idlegrid.errors import InvalidRequest, NoCapacity


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
        raise NoCapacity(model, "no live provider of it can enforce response_format or tools")
    return [c for c in cands if c.node_id in ok], {n: p for n, p in prices.items() if n in ok}


def invalid_failure(reason: str) -> InvalidRequest:
    """The 400 for a request a provider found invalid; `param: message` names the field."""
    param, _, message = reason.partition(": ")
    if param in (PARAM, "tools", "tool_choice", "parallel_tool_calls") and message:
        return InvalidRequest(message, param=param)
    return InvalidRequest(reason, param="prompt")
