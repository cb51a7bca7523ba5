"""One small tree of typed errors; each carries the data that explains it.

    IdlegridError
    ├── InvalidRequest          a parameter is out of range or malformed (param)
    ├── AuthError               bad API key, bad/stale/replayed node signature (reason)
    ├── InsufficientCredits     a hold or posting would overdraw (account, needed, available)
    ├── NotFound
    │   └── ModelNotFound       no such model on this grid (model)
    ├── Conflict
    │   ├── IllegalTransition   a lifecycle move that the rules forbid (kind, key, from, to)
    │   └── StaleAttempt        a node reports on an attempt it no longer holds (task, attempt)
    ├── LedgerError             an entry that does not balance, or a broken invariant
    ├── NoCapacity              no live provider can take the work (model, reasons)
    ├── EngineError             an engine failed to load or generate (engine, detail)
    │   └── EngineCrashed       its start-up check died by a signal (signal, model, hint)
    └── WorkspaceError          a lease's workspace on a provider (runtime)
        ├── SandboxUnavailable  this machine cannot isolate a workspace (runtime, reason)
        └── ProvisioningFailed  a step of making the workspace failed (lease, step, detail)

The core raises these; only the HTTP edge (coordinator/http_errors.py) knows status codes.
"""

from __future__ import annotations

from typing import Any


class IdlegridError(Exception):
    """Base of every error idlegrid raises on purpose."""

    code = "idlegrid_error"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class InvalidRequest(IdlegridError):
    """A request parameter is malformed or out of range."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.param = param


class AuthError(IdlegridError):
    """The caller could not be authenticated."""

    code = "unauthorized"

    def __init__(self, reason: str) -> None:
        super().__init__(reason, reason=reason)
        self.reason = reason


class RateLimited(IdlegridError):
    """A key sent more requests or tokens per minute than it may; retry after a while."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after_s: float) -> None:
        super().__init__(message, limit=limit, retry_after_s=retry_after_s)


class SpendCapReached(IdlegridError):
    """A key has spent what its operator allowed it; waiting does not help."""

    code = "spend_cap_reached"

    def __init__(self, key_id: str, cap: int, spent: int) -> None:
        super().__init__(
            f"API key {key_id} has spent {spent} µcr of its {cap} µcr cap",
            key_id=key_id,
            cap=cap,
            spent=spent,
        )


class InsufficientCredits(IdlegridError):
    """An account lacks the credits an operation needs."""

    code = "insufficient_credits"

    def __init__(self, account: str, needed: int, available: int) -> None:
        super().__init__(
            f"account {account} holds {available} µcr, needs {needed} µcr",
            account=account,
            needed=needed,
            available=available,
        )
        self.account = account
        self.needed = needed
        self.available = available


class UnpayableRuling(IdlegridError):
    """A dispute's ruling cannot be paid from the accounts that fund it (the loser's, then
    the fee pool). Nothing of the ruling is written; the dispute stays as it was and the
    next supervisor pass tries again."""

    code = "unpayable_ruling"

    def __init__(self, dispute_id: str, needed: int, available: int) -> None:
        super().__init__(
            f"dispute {dispute_id}: its ruling needs {needed} µcr, its funders hold {available}",
            dispute_id=dispute_id,
            needed=needed,
            available=available,
        )
        self.dispute_id = dispute_id
        self.needed = needed
        self.available = available


class NotFound(IdlegridError):
    """A named thing does not exist."""

    code = "not_found"


class Gone(IdlegridError):
    """A route that no longer serves; `data.use` names what replaced it."""

    code = "gone"


class ModelNotFound(NotFound):
    """No provider on this grid serves, or has ever served, this model."""

    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist on this grid", model=model)
        self.model = model


class Conflict(IdlegridError):
    """The request conflicts with the current state."""

    code = "conflict"


class IllegalTransition(Conflict):
    """A lifecycle transition that the rules do not allow: which lifecycle (`kind`), which
    thing (`key`), from and to which state, and the story that led there (the causes of
    its earlier moves, when the caller knows them)."""

    code = "illegal_transition"

    def __init__(
        self, kind: str, src: str, dst: str, *, key: str | None = None, story: tuple[str, ...] = ()
    ) -> None:
        what = f"{kind} {key}" if key is not None else kind
        super().__init__(
            f"{what}: {src} -> {dst} is not allowed",
            kind=kind,
            src=src,
            dst=dst,
            key=key,
            story=list(story),
        )
        self.kind = kind
        self.src = src
        self.dst = dst
        self.key = key
        self.story = tuple(story)

    @property
    def lifecycle(self) -> str:
        """The lifecycle's name (the same as `kind`)."""
        return self.kind


class StaleAttempt(Conflict):
    """A node reports on a task attempt that has been taken away from it."""

    code = "stale_attempt"

    def __init__(self, task_id: str, attempt: int) -> None:
        super().__init__(
            f"task {task_id} attempt {attempt} is no longer held", task_id=task_id, attempt=attempt
        )


class LedgerError(IdlegridError):
    """An entry does not balance or would break a ledger invariant."""

    code = "ledger_error"


class NoCapacity(IdlegridError):
    """No live provider can take the work right now."""

    code = "no_capacity"

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(
            f"no provider can serve '{model}' now: {reason}", model=model, reason=reason
        )
        self.model = model
        self.reason = reason


class PriceCapBelowOffers(NoCapacity):
    """Every live provider of the model asks more than the request's `max_price`: the
    consumer's own limit, so a 400 naming it (a batch line waits, as for any NoCapacity)."""

    code = "max_price_below_offers"

    def __init__(self, model: str, cap: dict[str, float], lowest: dict[str, float]) -> None:
        reason = (
            f"no live provider at or below max_price (prompt {cap['prompt']:g}, output "
            f"{cap['output']:g} credits per 1M tokens; the lowest offers are prompt "
            f"{lowest['prompt']:g}, output {lowest['output']:g}): send a higher max_price"
        )
        super().__init__(model, reason)
        self.data.update(param="max_price", max_price=cap, lowest_offers=lowest)


class EngineError(IdlegridError):
    """An engine failed to load or to generate."""

    code = "engine_error"


class EngineCrashed(EngineError):
    """The engine's start-up check died by a signal (SIGILL, SIGSEGV, an OOM kill...)."""

    code = "engine_crashed"

    def __init__(self, *, engine: str, model: str, signal: str, hint: str, tail: str = "") -> None:
        message = (
            f"the {engine} engine died with {signal} while loading {model} and decoding "
            f"its first tokens: {hint}"
        )
        super().__init__(message, engine=engine, detail=tail)
        self.data.update(model=model, signal=signal, hint=hint)


class WorkspaceError(IdlegridError):
    """A lease's workspace on a provider could not be made, run or ended."""

    code = "workspace_error"


class SandboxUnavailable(WorkspaceError):
    """The runtime cannot give a workspace the isolation it promises on this machine (no
    bubblewrap, no cgroup controller, not root...), or was not chosen explicitly."""

    code = "sandbox_unavailable"

    def __init__(self, runtime: str, reason: str) -> None:
        super().__init__(
            f"the {runtime} workspace runtime is unavailable: {reason}", runtime=runtime
        )
        self.data["reason"] = reason
        self.runtime = runtime
        self.reason = reason


class ProvisioningFailed(WorkspaceError):
    """One step of making a lease's workspace (disk, cgroup, venv, pip) failed."""

    code = "provisioning_failed"

    def __init__(self, lease: str, step: str, detail: str, *, exit_code: int | None = None) -> None:
        super().__init__(
            f"workspace {lease}: {step} failed: {detail}",
            lease=lease,
            step=step,
            detail=detail,
            exit_code=exit_code,
        )
        self.lease = lease
        self.step = step
        self.detail = detail
        self.exit_code = exit_code
