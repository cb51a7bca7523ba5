"""Disputes over a failed audit: the positions they bisect, what "agree" means at one
position, and the ledger entries of a ruling. Pure: the coordinator is the shell.

Positions are the commitment's chunks 0..n-1 plus one more, n, for the finish claim (an
end token, a stop string or the length limit). At a chunk position the parties agree when
the verifier's recomputation of that chunk is within tolerance of the committed chunk and
both used the same context; at the finish position, when the recomputation upholds the
claim. A party answers for one position with a `Report` holding that one chunk (or none
at the finish position), so the referee's recompute covers one position, not the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from idlegrid.core import ledger
from idlegrid.core.ledger import FEES, Cause, Entry, Posting
from idlegrid.core.trust import commitment as cm
from idlegrid.errors import UnpayableRuling


def n_positions(c: cm.Commitment) -> int:
    """Chunks plus the finish claim."""
    return len(c.chunks) + 1


def only_position(report: cm.Report, position: int, n_chunks: int) -> cm.Report:
    """The part of a full recomputation that answers for one position."""
    chunks = (report.chunks[position],) if position < n_chunks else ()
    return cm.Report(
        report.context_hash, chunks, report.end_ok, report.det_class, report.context_len
    )


def faults_at(c: cm.Commitment, position: int, answer: cm.Report, tol: cm.Tolerance) -> list[str]:
    """Why a one-position answer disagrees with the commitment there (empty: agreement)."""
    reasons = cm.context_faults(c.header, answer)
    if position < len(c.chunks):
        if len(answer.chunks) != 1:
            return [*reasons, f"position {position}: the answer must hold exactly one chunk"]
        reasons.extend(cm.chunk_faults(position, c.chunks[position], answer.chunks[0], tol))
    elif position == len(c.chunks):
        if not answer.end_ok:
            reasons.append(f"finish reason '{c.header.finish_reason}' is not what the model did")
    else:
        reasons.append(f"no position {position}")
    return reasons


def disagreeing(c: cm.Commitment, report: cm.Report, tol: cm.Tolerance) -> list[int]:
    """Every position at which a full recomputation disagrees with the commitment."""
    if len(report.chunks) != len(c.chunks):
        return list(range(n_positions(c)))
    return [
        p
        for p in range(n_positions(c))
        if faults_at(c, p, only_position(report, p, len(c.chunks)), tol)
    ]


def truncated(c: cm.Commitment, position: int) -> cm.Commitment:
    """The commitment up to and including chunk `position` (all of it for the finish claim):
    what a referee recomputes to check one position without paying for the rest."""
    if position >= len(c.chunks):
        return c
    return cm.Commitment(c.header, c.chunks[: position + 1])


def reversal(
    dispute_id: str,
    originals: Sequence[Entry],
    balances: Mapping[str, int],
    cover: Mapping[str, int],
) -> tuple[Entry | None, dict[str, int]]:
    """Undo the postings of a slash that a dispute overturned.

    Accounts that received money give it back as far as they still hold it (balances never
    go negative); what they can no longer return is taken from `cover` (the false
    verifier's stakes, in order). If even that falls short, the overturned party gets back
    less, stakes first. Returns the entry and what it took from each cover account.
    """
    back: dict[str, int] = {}
    for e in originals:
        for p in e.postings:
            back[p.account] = back.get(p.account, 0) - p.amount
    postings: list[Posting] = []
    owed = sum(v for v in back.values() if v > 0)
    collected = 0
    for acct, amount in back.items():
        if amount < 0:
            take = min(-amount, max(balances.get(acct, 0), 0))
            if take:
                postings.append(Posting(acct, -take))
                collected += take
    used: dict[str, int] = {}
    for acct, bal in cover.items():
        if collected >= owed:
            break
        take = min(owed - collected, bal)
        if take > 0:
            postings.append(Posting(acct, -take))
            used[acct] = take
            collected += take
    left = collected
    # Stakes before the forfeited accrual: the stake is what routing and ejection weigh.
    for acct in sorted(
        (a for a, v in back.items() if v > 0), key=lambda a: (not a.startswith("stake:"), a)
    ):
        give = min(back[acct], left)
        if give:
            postings.append(Posting(acct, give))
            left -= give
    if not postings:
        return None, used
    return (
        ledger.make_entry(
            f"reverse:{dispute_id}", Cause("dispute", dispute_id), postings, "slash reversed"
        ),
        used,
    )


def penalty(
    dispute_id: str, stakes: Mapping[str, int], provider: str, provider_bps: int = 5_000
) -> list[Entry]:
    """A verifier whose accusation a referee overturned loses its stakes: part goes to the
    wrongly accused provider, the rest is burned to fees (as a canary slash would)."""
    out = []
    for acct, bal in stakes.items():
        if bal <= 0:
            continue
        to_provider = bal * provider_bps // 10_000
        out.append(
            ledger.make_entry(
                f"dispute-penalty:{dispute_id}:{acct}",
                Cause("dispute", dispute_id),
                [
                    Posting(acct, -bal),
                    Posting(ledger.provider_account(provider), to_provider),
                    Posting(FEES, bal - to_provider),
                ],
                "false accusation",
            )
        )
    return out


def referee_pay(dispute_id: str, referee: str, amount: int, fees_balance: int) -> Entry | None:
    """Pay the third party for its recompute out of protocol fees (capped by what they hold)."""
    pay = min(amount, fees_balance)
    if pay <= 0:
        return None
    return ledger.make_entry(
        f"referee-pay:{dispute_id}",
        Cause("dispute", dispute_id),
        [Posting(FEES, -pay), Posting(ledger.provider_account(referee), pay)],
        "referee pay",
    )


def dispute_fee(dispute_id: str, provider: str, amount: int, balance: int) -> Entry | None:
    """A provider that contested a correct audit pays for the referee's work (what it has)."""
    fee = min(amount, balance)
    if fee <= 0:
        return None
    return ledger.make_entry(
        f"dispute-fee:{dispute_id}",
        Cause("dispute", dispute_id),
        [Posting(ledger.provider_account(provider), -fee), Posting(FEES, fee)],
        "dispute fee",
    )


def apply(balances: Mapping[str, int], entries: Sequence[Entry | None]) -> dict[str, int]:
    """Balances after `entries` (to plan the next posting of one ruling)."""
    out = dict(balances)
    for e in entries:
        for p in e.postings if e is not None else ():
            out[p.account] = out.get(p.account, 0) + p.amount
    return out


def panel_pay(
    dispute_id: str, panelists: Sequence[str], each: int, funders: Mapping[str, int]
) -> Entry | None:
    """Pay each panelist of the majority `each` µcr, drawn from `funders` in order (the
    loser's accounts first, the fee pool last), as far as each holds. Raises
    `UnpayableRuling` if together they cannot cover it: the ruling is then not written."""
    owed = each * len(panelists)
    if owed <= 0:
        return None
    available = sum(max(b, 0) for b in funders.values())
    if available < owed:
        raise UnpayableRuling(dispute_id, owed, available)
    postings: list[Posting] = []
    left = owed
    for acct, bal in funders.items():
        take = min(left, max(bal, 0))
        if take:
            postings.append(Posting(acct, -take))
            left -= take
        if not left:
            break
    postings.extend(Posting(ledger.provider_account(p), each) for p in panelists)
    return ledger.make_entry(
        f"panel-pay:{dispute_id}", Cause("dispute", dispute_id), postings, "panel pay"
    )
