"""A batch's lifecycle, as a table (OpenAI's states and the moves between them). Pure.

    validating ──▶ in_progress ──▶ finalizing ──▶ completed
        │              │  │
        │              │  └──▶ expired            (the completion window passed)
        ├──▶ failed    │                          (the input failed validation)
        └──────────────┴──▶ cancelling ──▶ cancelled

- `failed` is OpenAI's "the input file has failed the validation process": only a
  validating batch fails. Once lines run, a bad line goes to the error file and the batch
  still completes; a storage error while finalizing is retried, never a `failed` batch
  whose answers were paid for.
- A batch may be cancelled while validating or in progress. Finalizing means every line
  has its answer and only the output files are being written: nothing is left to cancel,
  so a cancel then is refused (409), as is a cancel of a batch already ended.
- `expired`: the completion window passed while lines were still running; the answers
  already given stay in the output file, the rest are refunded. A finalizing batch is not
  expired (its work is done), nor is a cancelling one (it ends within moments).

Each state a batch enters is stamped on it (`STAMPS`: `in_progress_at`, ...), as the
OpenAI object reports; `created_at` stamps `validating`.
"""

from __future__ import annotations

from enum import StrEnum

from idlegrid.core.lifecycle import Lifecycle


class BatchState(StrEnum):
    """Where a batch is (the strings OpenAI's `status` takes)."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


_B = BatchState
BATCH = Lifecycle.of(
    "batch",
    BatchState,
    {
        _B.VALIDATING: {_B.IN_PROGRESS, _B.FAILED, _B.CANCELLING},
        _B.IN_PROGRESS: {_B.FINALIZING, _B.EXPIRED, _B.CANCELLING},
        _B.FINALIZING: {_B.COMPLETED},
        _B.CANCELLING: {_B.CANCELLED},
    },
    initial={_B.VALIDATING},
)

# The timestamp field of the OpenAI batch object that entering each state sets.
STAMPS: dict[str, str] = {
    _B.VALIDATING: "created_at",
    _B.FAILED: "failed_at",
    _B.IN_PROGRESS: "in_progress_at",
    _B.FINALIZING: "finalizing_at",
    _B.COMPLETED: "completed_at",
    _B.EXPIRED: "expired_at",
    _B.CANCELLING: "cancelling_at",
    _B.CANCELLED: "cancelled_at",
}


def cancel(state: str, *, key: str | None = None) -> str:
    """The state a cancel request moves a batch to (`cancelling`), or IllegalTransition."""
    return BATCH.move(state, _B.CANCELLING, key=key)
