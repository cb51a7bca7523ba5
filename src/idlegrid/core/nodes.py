"""The lifecycle of a node, as a table. Pure.

    live ⇄ draining     (the agent's heartbeat says which; draining stops new work)
    live | draining ──▶ gone ──register──▶ live

A node row starts live (registration). Registering again, or a heartbeat that repeats the
state the node is in, is not a move. Nothing writes `gone` today: a node that stops
sending heartbeats is shown as gone once it is past the node timeout, its row stays live.
"""

from __future__ import annotations

from enum import StrEnum

from idlegrid.core.lifecycle import Lifecycle


class NodeState(StrEnum):
    """A node's declared state (migration 0001: `nodes.state`)."""

    LIVE = "live"
    DRAINING = "draining"
    GONE = "gone"


_N = NodeState
NODE = Lifecycle.of(
    "node",
    NodeState,
    {
        _N.LIVE: {_N.DRAINING, _N.GONE},
        _N.DRAINING: {_N.LIVE, _N.GONE},
        _N.GONE: {_N.LIVE},
    },
    initial={_N.LIVE},
)
