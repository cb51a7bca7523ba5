"""What a training dispute round asks, computed (the dispute role, `disputes.py`, asks and
answers; `coordinator/training/disputes.py` drives the game).

The provider answers from its kept checkpoints with its own executor: it replays from the
segment's start to the disputed step and traces that step. The challenger answers from its
replay of the segment (the same executor call its audit made). A referee traces the
disputed step from the agreed state and reports its own record of the disputed op (or the
step's end state hash). Torch is imported by the executor only when a query arrives.
"""

from __future__ import annotations

import base64
from typing import Any

from idlegrid.agent.roles.trainer import TorchExecutor, Training
from idlegrid.core.trust.merkle import merkle_proof, merkle_root


class TrainReplay:
    """Training dispute answers: as provider from `training`'s kept checkpoints, as
    challenger from its replay, as referee with the reference executor."""

    def __init__(self, training: Training) -> None:
        self.training = training
        # Per (dispute, role): what was recomputed for earlier rounds.
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}

    def compute(self, ex: Any, got: dict[str, Any]) -> dict[str, Any]:
        """The answer body for one query (runs in a worker thread)."""
        from idlegrid.core.training import dispute
        from idlegrid.core.training.proof import TrainingCommitment
        from idlegrid.core.training.spec import JobSpec

        spec = JobSpec.parse(got["spec"])
        c = TrainingCommitment.from_bytes(base64.b64decode(got["commitment"]))
        role, phase, step = got["role"], got["phase"], got.get("step")
        if role == "referee":
            return _referee(ex, spec, got)
        memo = self.cache.setdefault((got["dispute_id"], role), {})
        start = self._start(ex, spec, got, role)
        if phase in ("claim", "steps"):  # the challenger opens its replay's state hashes
            if "leaves" not in memo:
                memo["leaves"], _ = ex.replay(spec, start, c.start_step, c.end_step)
            i = int(got["step"]) - c.start_step
            return {"state_hash": memo["leaves"][i].state_hash.hex()}
        assert step is not None
        key = f"step-{step}"
        if key not in memo:
            state = ex.start(spec, start)
            if int(step) > c.start_step:
                state, _ = ex.run(spec, state, int(step), _noop)
            ckpt = ex.checkpoint(spec, state)
            agreed = c.start_hash if int(step) == c.start_step else c.leaf(int(step) - 1).state_hash
            records = ex.trace(spec, state)
            links, link = [], agreed
            for r in records:
                link = dispute.chain_next(link, r)
                links.append(link)
            memo[key] = {"records": records, "links": links, "checkpoint": ckpt}
        m = memo[key]
        links, records = m["links"], m["records"]
        if phase == "ops-commit":
            n = len(links)
            p = merkle_proof(links, n - 1)
            return {
                "n_ops": n,
                "root": merkle_root(links).hex(),
                "link": links[-1].hex(),
                "siblings": [h.hex() for h in p.siblings],
                "right": list(p.right),
            }
        if phase == "ops":
            i = int(got["op_index"])
            if i >= len(links):
                return {"link": ""}
            p = merkle_proof(links, i)
            return {
                "link": links[i].hex(),
                "siblings": [h.hex() for h in p.siblings],
                "right": list(p.right),
            }
        if phase == "records":
            j = int(got["op_index"])
            return {"record": base64.b64encode(records[j] if j < len(records) else b"").decode()}
        if phase == "referee":  # the provider hands over the agreed state before the step
            return {"checkpoint": base64.b64encode(m["checkpoint"]).decode()}
        raise ValueError(f"unknown dispute phase {phase}")

    def _start(self, ex: Any, spec: Any, got: dict[str, Any], role: str) -> bytes:
        """The segment's start checkpoint: the provider's own kept one when it has it, else the
        coordinator's copy (bound to the commitment by its hash); step 0 from the spec."""
        if got["start_step"] == 0:
            return bytes(ex.initial_checkpoint(spec))
        if role == "provider":
            kept = self.training.checkpoints.get((got["job_id"], got["start_step"]))
            if kept is not None:
                return bytes(kept)
        return base64.b64decode(got["start_checkpoint"])


def _noop(*_: Any) -> None:
    return None


def _referee(ex: Any, spec: Any, got: dict[str, Any]) -> dict[str, Any]:
    """Trace the disputed step from the agreed state: our record of the disputed op, or
    the step's end state hash when both parties' op chains agree."""
    # The referee runs the reference program whatever executor this agent trains with.
    ref = TorchExecutor(getattr(ex, "threads", None))
    ckpt = base64.b64decode(got["agreed_checkpoint"]) if got.get("agreed_checkpoint") else None
    state = ref.start(spec, ckpt)
    out = {"det_class": ref.det_class(spec), "start_hash": ref.state_hash(spec, state).hex()}
    j = got.get("op_index")
    if j is None:
        _, leaves = ref.run(spec, state, int(got["step"]) + 1, _noop)
        out["state_hash"] = leaves[-1].state_hash.hex()
        return out
    records = ref.trace(spec, state)
    out["record"] = base64.b64encode(records[j] if j < len(records) else b"").decode()
    return out
