"""Training placement: topology model, DT-FM and full cost models, memetic planner, baselines.

Pure: numpy only, no I/O; randomness and time come in as arguments.
"""

from idlegrid.core.planner.cost import CostModel, Plan
from idlegrid.core.planner.planner import PlanResult, baselines, plan_topology
from idlegrid.core.planner.topology import (
    Compression,
    Device,
    ModelSpec,
    Topology,
    parse_topology,
    topology_to_json,
)

__all__ = [
    "Compression",
    "CostModel",
    "Device",
    "ModelSpec",
    "Plan",
    "PlanResult",
    "Topology",
    "baselines",
    "parse_topology",
    "plan_topology",
    "topology_to_json",
]
