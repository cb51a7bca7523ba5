"""Training money as ledger entries: escrow, stake, pay per verified segment, slash, refund. Pure.

    consumer ──escrow──▶ escrow:job:<id> ──segment accepted──▶ provider:<node> (less fee ▶ fees)
                              ├──segment never to be paid──▶ consumer
                              └──close (what is left)──▶ consumer
    provider:<node> ──stake──▶ stake:<node>:job-<id> ──slash──▶ consumer / verifier / fees
    system:fees ──audit fee──▶ provider:<verifier>

A segment's escrow leaves the escrow once: paying it and refunding it share the key
`train-seg:<job>:<segment>`, so whichever is posted first wins and the other is a no-op.
The key names the segment, not the provider, so a segment re-run on another provider (after
a provider loss or a proven fault) is still paid once: the consumer pays once per step.
Every other key names its cause too (`train-slash:<job>:<segment>:<node>`, since a segment
re-run after a rewind can fault again; `train-audit-pay:<audit>`, ...), so a replayed
decision posts nothing twice.
"""

from __future__ import annotations

from idlegrid.core.ledger import (
    FEES,
    Cause,
    Entry,
    Posting,
    consumer_account,
    fee_of,
    make_entry,
    provider_account,
    stake_account,
)
from idlegrid.errors import LedgerError

DEFAULT_FEE_BPS = 500
DEFAULT_VERIFIER_BPS = 5_000


def job_escrow_account(job_id: str) -> str:
    """Escrow of a training job, drawn down per verified segment."""
    return f"escrow:job:{job_id}"


def job_stake_account(job_id: str, node_id: str) -> str:
    """The stake a provider posted for one job; slashed on a proven fault in that job."""
    return stake_account(node_id, f"job-{job_id}")


def segment_amount(price_per_step: int, start: int, end: int) -> int:
    """µcr a segment [start, end) is worth."""
    if end <= start:
        raise LedgerError("empty segment", start=start, end=end)
    return price_per_step * (end - start)


def _positive(amount: int, what: str) -> None:
    if amount <= 0:
        raise LedgerError(f"{what} must be positive, got {amount}", amount=amount)


def _segment_cause(job_id: str, segment: int) -> Cause:
    return Cause("train-segment", f"{job_id}:{segment}")


def escrow(job_id: str, key_id: str, amount: int) -> Entry:
    """Move the job's full price from the consumer into the job's escrow at submission."""
    _positive(amount, "escrow")
    return make_entry(
        f"train-escrow:{job_id}",
        Cause("job", job_id),
        [Posting(consumer_account(key_id), -amount), Posting(job_escrow_account(job_id), amount)],
        "train escrow",
    )


def stake(job_id: str, node_id: str, amount: int) -> Entry:
    """Lock a provider's stake for a job it takes."""
    _positive(amount, "stake")
    return make_entry(
        f"train-stake:{job_id}:{node_id}",
        Cause("job", job_id),
        [
            Posting(provider_account(node_id), -amount),
            Posting(job_stake_account(job_id, node_id), amount),
        ],
        "train stake",
    )


def unstake(job_id: str, node_id: str, amount: int) -> Entry:
    """Return a provider's job stake once the job's challenge windows are over."""
    _positive(amount, "unstake")
    return make_entry(
        f"train-unstake:{job_id}:{node_id}",
        Cause("job", job_id),
        [
            Posting(job_stake_account(job_id, node_id), -amount),
            Posting(provider_account(node_id), amount),
        ],
        "train unstake",
    )


def pay_segment(
    job_id: str, segment: int, node_id: str, amount: int, fee_bps: int, gang: tuple[str, ...] = ()
) -> Entry:
    """Pay an accepted segment (audited and passed, or unselected with its window over)
    from the escrow to the provider that committed it, less the protocol fee. A
    data-parallel segment (`gang`: every rank, the committer first) is split equally
    between the ranks, the remainder of the division to the committer; one entry, one key."""
    _positive(amount, "segment pay")
    fee = fee_of(amount, fee_bps)
    ranks = gang or (node_id,)
    share, rest = divmod(amount - fee, len(ranks))
    pays = [
        Posting(provider_account(n), share + (rest if i == 0 else 0)) for i, n in enumerate(ranks)
    ]
    return make_entry(
        f"train-seg:{job_id}:{segment}",
        _segment_cause(job_id, segment),
        [Posting(job_escrow_account(job_id), -amount), *pays, Posting(FEES, fee)],
        f"train pay {node_id}",
    )


def refund_segment(job_id: str, segment: int, key_id: str, amount: int) -> Entry:
    """Give a segment's escrow back to the consumer: the segment will never be paid
    (a proven fault and the job is not re-run). Shares its key with `pay_segment`."""
    _positive(amount, "segment refund")
    return make_entry(
        f"train-seg:{job_id}:{segment}",
        _segment_cause(job_id, segment),
        [Posting(job_escrow_account(job_id), -amount), Posting(consumer_account(key_id), amount)],
        "train refund",
    )


def close(job_id: str, key_id: str, remaining: int) -> Entry:
    """Refund what is left in the escrow when the job ends (done, cancelled or abandoned)."""
    _positive(remaining, "refund of unused escrow")
    return make_entry(
        f"train-close:{job_id}",
        Cause("job", job_id),
        [
            Posting(job_escrow_account(job_id), -remaining),
            Posting(consumer_account(key_id), remaining),
        ],
        "train close",
    )


def slash(
    job_id: str,
    segment: int,
    node_id: str,
    stake_balance: int,
    amount: int,
    key_id: str,
    compensation: int,
    verifier: str | None,
    verifier_bps: int = DEFAULT_VERIFIER_BPS,
) -> Entry | None:
    """Take up to `amount` of the provider's job stake for a proven fault in `segment`:
    the consumer's compensation first, then the verifier's share of the rest, the rest
    burned to fees (so reporting oneself never pays). None if the stake is empty."""
    take = min(amount, stake_balance)
    if take <= 0:
        return None
    to_consumer = min(max(compensation, 0), take)
    rest = take - to_consumer
    to_verifier = rest * verifier_bps // 10_000 if verifier else 0
    postings = [
        Posting(job_stake_account(job_id, node_id), -take),
        Posting(consumer_account(key_id), to_consumer),
        Posting(FEES, rest - to_verifier),
    ]
    if verifier:
        postings.append(Posting(provider_account(verifier), to_verifier))
    return make_entry(
        f"train-slash:{job_id}:{segment}:{node_id}",
        _segment_cause(job_id, segment),
        postings,
        f"train slash {node_id}",
    )


def audit_fee(audit_id: str, verifier: str, amount: int, pool_balance: int) -> Entry | None:
    """Pay a verifier for one segment audit out of the protocol fees (capped by the pool)."""
    pay = min(amount, pool_balance)
    if pay <= 0:
        return None
    return make_entry(
        f"train-audit-pay:{audit_id}",
        Cause("train-audit", audit_id),
        [Posting(FEES, -pay), Posting(provider_account(verifier), pay)],
        "train audit pay",
    )


def verifier_slash(
    ref: str, stake_acct: str, stake_balance: int, amount: int, reason: str
) -> Entry | None:
    """Slash a verifier: it approved a canary, or lost a dispute it raised. To fees (jackpot)."""
    take = min(amount, stake_balance)
    if take <= 0:
        return None
    return make_entry(
        f"train-vslash:{ref}",
        Cause("train-audit", ref),
        [Posting(stake_acct, -take), Posting(FEES, take)],
        reason,
    )
