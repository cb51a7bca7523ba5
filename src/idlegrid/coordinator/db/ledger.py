"""The ledger's storage: compare-and-set appends to the hash chain, balances, verification.

A mixin of `Store` (db/store.py): it shares the store's sessions and clock. The rules
(what balances, what may go negative, how entries chain) are the pure `core/ledger.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from idlegrid.coordinator.db.tables import Account, LedgerEntry, LedgerHead, LedgerPosting, table
from idlegrid.core import income, ledger
from idlegrid.core.ledger import Entry
from idlegrid.errors import InsufficientCredits, LedgerError

# Core statements on the tables, not the ORM classes: executed through a Session, an
# ORM-entity insert or update takes the bulk-persistence path, several times slower.
_ACC, _ENT, _HEAD = Account.__table__.c, LedgerEntry.__table__.c, LedgerHead.__table__.c
_POST = LedgerPosting.__table__.c
_ENTRY_BY_KEY = select(_ENT.seq).where(_ENT.key == bindparam("key"))
_HEAD_FOR_UPDATE = select(_HEAD.seq, _HEAD.hash).where(_HEAD.id == 1).with_for_update()
_KNOWN_ACCOUNTS = select(_ACC.id).where(_ACC.id.in_(bindparam("ids", expanding=True)))
_CREDIT = (
    update(table(Account))
    .where(_ACC.id == bindparam("acct"))
    .values(balance=_ACC.balance + bindparam("amount"))
)
_DEBIT = (
    update(table(Account))
    .where(_ACC.id == bindparam("acct"), _ACC.balance >= -bindparam("amount"))
    .values(balance=_ACC.balance + bindparam("amount"))
)
_INSERT_ACCOUNT = insert(table(Account))
_INSERT_ENTRY = insert(table(LedgerEntry))
_INSERT_POSTING = insert(table(LedgerPosting))
_ADVANCE_HEAD = (
    update(table(LedgerHead))
    .where(_HEAD.id == 1)
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)


# Set in a session's info when an entry moves stake (Store.tx reports it after commit).
STAKES_MOVED = "stakes_moved"


class LedgerStore:
    """Appends and reads of the double-entry ledger, inside the store's transactions."""

    clock: Callable[[], float]
    _ensure_accounts: Any

    def tx(self) -> AbstractContextManager[Session]:
        """A write transaction (the store provides it)."""
        raise NotImplementedError

    def read(self) -> AbstractContextManager[Session]:
        """A read transaction (the store provides it)."""
        raise NotImplementedError

    def _post(self, s: Session, entry: Entry, *, fresh: bool = False) -> bool:
        """Append `entry` inside the caller's transaction; False if its key was posted before.

        `fresh`: the caller knows the key is new (it names a row this transaction just
        inserted), so the idempotency lookup is skipped; the unique key still guards it.
        """
        # Prebuilt Core statements with bound parameters: this runs on every request's path
        # to its first token, and building statements cost more than SQLite running them.
        if not fresh and s.execute(_ENTRY_BY_KEY, {"key": entry.key}).first() is not None:
            return False
        head = s.execute(_HEAD_FOR_UPDATE).one()
        accounts = [p.account for p in entry.postings]
        if any(a.startswith(ledger.STAKE_PREFIX) for a in accounts):
            s.info[STAKES_MOVED] = True
        if self._ensure_accounts is not None:
            s.execute(self._ensure_accounts, [{"id": a, "balance": 0} for a in accounts])
        else:
            known = set(s.scalars(_KNOWN_ACCOUNTS, {"ids": accounts}))
            missing = [{"id": a, "balance": 0} for a in accounts if a not in known]
            if missing:
                s.execute(_INSERT_ACCOUNT, missing)
        for p in entry.postings:
            # Compare-and-set: a debit lands only if the balance covers it.
            guarded = p.amount < 0 and not ledger.may_go_negative(p.account)
            res = s.execute(_DEBIT if guarded else _CREDIT, {"acct": p.account, "amount": p.amount})
            if res.rowcount != 1:  # type: ignore[attr-defined]
                available = s.scalar(select(Account.balance).where(Account.id == p.account)) or 0
                raise InsufficientCredits(p.account, needed=-p.amount, available=available)
        digest = ledger.chain_hash(head.hash, entry)
        seq = head.seq + 1
        s.execute(
            _INSERT_ENTRY,
            {
                "seq": seq,
                "key": entry.key,
                "cause_kind": entry.cause.kind,
                "cause_id": entry.cause.id,
                "memo": entry.memo,
                "prev_hash": head.hash,
                "hash": digest,
                "created_at": self.clock(),
            },
        )
        s.execute(
            _INSERT_POSTING,
            [{"entry_seq": seq, "account": p.account, "amount": p.amount} for p in entry.postings],
        )
        s.execute(_ADVANCE_HEAD, {"new_seq": seq, "new_hash": digest})
        return True

    def post(self, entry: Entry) -> bool:
        """Append one entry in its own transaction; idempotent on the entry key."""
        with self.tx() as s:
            return self._post(s, entry)

    def balance(self, account: str) -> int:
        """Current balance of an account, µcr."""
        with self.read() as s:
            return s.scalar(select(Account.balance).where(Account.id == account)) or 0

    def balances(self) -> dict[str, int]:
        """Every account's balance."""
        with self.read() as s:
            return {a.id: a.balance for a in s.scalars(select(Account))}

    def entries(self, cause_id: str | None = None, after_seq: int = 0) -> list[dict[str, Any]]:
        """Ledger entries with their postings, oldest first (one cause's, or after a seq)."""
        with self.read() as s:
            q = select(LedgerEntry).where(LedgerEntry.seq > after_seq).order_by(LedgerEntry.seq)
            pq = select(LedgerPosting.entry_seq, LedgerPosting.account, LedgerPosting.amount).where(
                LedgerPosting.entry_seq > after_seq
            )
            if cause_id is not None:
                q = q.where(LedgerEntry.cause_id == cause_id)
                pq = pq.join(LedgerEntry, LedgerEntry.seq == LedgerPosting.entry_seq).where(
                    LedgerEntry.cause_id == cause_id
                )
            postings: dict[int, list[dict[str, Any]]] = {}
            for seq, account, amount in s.execute(pq.order_by(LedgerPosting.account)):
                postings.setdefault(seq, []).append({"account": account, "amount": amount})
            return [
                {
                    "seq": e.seq,
                    "key": e.key,
                    "cause": {"kind": e.cause_kind, "id": e.cause_id},
                    "memo": e.memo,
                    "hash": e.hash,
                    "prev_hash": e.prev_hash,
                    "created_at": e.created_at,
                    "postings": postings.get(e.seq, []),
                }
                for e in s.scalars(q)
            ]

    def provider_income(self, since: float = 0.0) -> dict[str, income.Income]:
        """Each provider's income for work since `since`, by source (core/income.py):
        never a mint, a deposit or its own stake moving."""
        with self.read() as s:
            rows = s.execute(
                select(_ENT.key, _ENT.memo, _POST.account, _POST.amount)
                .select_from(table(LedgerPosting))
                .join(table(LedgerEntry), _ENT.seq == _POST.entry_seq)
                .where(
                    _ENT.created_at >= since,
                    _POST.account.like("provider:%")
                    | _POST.account.like("accrual:%")
                    | _POST.account.like("stake:%"),
                )
            ).all()
        return income.tally((k, m or "", a, int(v)) for k, m, a, v in rows)

    def deposits(self) -> dict[str, int]:
        """µcr minted into each provider, accrual or stake account, ever: the mint entries
        first (one pass over the entries), then only their postings."""
        with self.read() as s:
            # LIKE, not a key range: under PostgreSQL's locale collations punctuation does
            # not order as in C, and a range would miss keys.
            seqs = list(
                s.scalars(select(_ENT.seq).where(_ENT.memo == "mint", _ENT.key.like("mint:%")))
            )
            out: dict[str, int] = {}
            for i in range(0, len(seqs), 500):
                for account, amount in s.execute(
                    select(_POST.account, _POST.amount).where(
                        _POST.entry_seq.in_(seqs[i : i + 500]),
                        _POST.account.like("provider:%")
                        | _POST.account.like("accrual:%")
                        | _POST.account.like("stake:%"),
                    )
                ):
                    out[account] = out.get(account, 0) + int(amount)
        return out

    def verify_ledger(self) -> list[str]:
        """Recompute the hash chain and every balance; return the problems found (none: [])."""
        problems: list[str] = []
        prev = ledger.GENESIS_HASH
        sums: dict[str, int] = {}
        for e in self.entries():
            entry = ledger.Entry(
                e["key"],
                ledger.Cause(e["cause"]["kind"], e["cause"]["id"]),
                tuple(ledger.Posting(p["account"], p["amount"]) for p in e["postings"]),
                e["memo"],
            )
            if e["prev_hash"] != prev:
                problems.append(f"entry {e['seq']}: prev_hash does not match entry {e['seq'] - 1}")
            if ledger.chain_hash(e["prev_hash"], entry) != e["hash"]:
                problems.append(f"entry {e['seq']}: hash does not match its contents")
            if sum(p.amount for p in entry.postings) != 0:
                problems.append(f"entry {e['seq']}: does not balance")
            for p in entry.postings:
                sums[p.account] = sums.get(p.account, 0) + p.amount
            prev = e["hash"]
        cached = self.balances()
        for account in sorted(set(sums) | set(cached)):
            if sums.get(account, 0) != cached.get(account, 0):
                problems.append(
                    f"{account}: cached balance {cached.get(account, 0)} != postings "
                    f"{sums.get(account, 0)}"
                )
        try:
            ledger.check_invariants(sums)
        except LedgerError as exc:
            problems.append(str(exc))
        return problems
