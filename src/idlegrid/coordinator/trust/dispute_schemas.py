"""Response models of the one dispute route family: a dispute of either kind.

Each game's view has its own model (`trust/schemas.py` InferenceDispute,
`training/schemas.py` TrainDispute), told apart by `kind`; kept apart from
`trust/schemas.py`, which the node schemas import, so that no import goes in a circle.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, RootModel

from idlegrid.coordinator.training.schemas import TrainDispute, TrainDisputeQuery
from idlegrid.coordinator.trust.schemas import InferenceDispute, InferenceDisputeQuery


class Dispute(RootModel[Annotated[InferenceDispute | TrainDispute, Field(discriminator="kind")]]):
    """A dispute of either kind, told apart by `kind`."""


class DisputeQuery(RootModel[InferenceDisputeQuery | TrainDisputeQuery]):
    """What the current round asks of the caller, of either kind (the caller knows which
    from its heartbeat)."""


class DisputeList(BaseModel):
    """GET /disputes: every kind in one list, newest first."""

    disputes: list[Dispute]
