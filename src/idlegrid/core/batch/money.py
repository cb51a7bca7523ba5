"""What a batch costs and who pays: the batch price, the escrow account, the causes of its
ledger entries, the escrow's entries. Pure.

The whole batch's worst case is escrowed at creation in `escrow:batch:<id>` (one entry,
`batch_escrow`). Each line then runs as an ordinary grid task whose payer is that account
instead of the consumer: its hold comes out of the batch escrow and its settlement returns
the unused part there, with the line (`batch_line:<batch>/<custom_id>`) as the cause. What
is left when the batch ends (completed, expired, cancelled, failed) goes back to the
consumer in one entry (`batch_refund`), so no escrow is left behind.
"""

from __future__ import annotations

from idlegrid.core.ledger import Cause, Entry, Posting, Price, make_entry

DEFAULT_SHARE_BPS = 5_000  # a batch token costs half an interactive one by default


def escrow_account(batch_id: str) -> str:
    """The account holding a batch's escrow while it runs."""
    return f"escrow:batch:{batch_id}"


def line_cause(batch_id: str, custom_id: str) -> Cause:
    """The cause of a line's hold and settlement: the batch and the line's custom_id."""
    return Cause("batch_line", f"{batch_id}/{custom_id}")


def batch_price(price: Price, share_bps: int | None = DEFAULT_SHARE_BPS) -> Price | None:
    """A provider's batch price from its interactive one (`share_bps` of it, rounded down),
    or None when it serves no batch work (`share_bps` None)."""
    if share_bps is None:
        return None
    if not 0 <= share_bps <= 10_000:
        raise ValueError(f"a batch share is 0 to 10,000 basis points, not {share_bps}")
    return Price(price.prompt * share_bps // 10_000, price.output * share_bps // 10_000)


def provider_share(serves: bool, own_bps: int | None, default_bps: int | None) -> int | None:
    """A provider's batch price as a share of its interactive one: its own if it set one,
    else the grid's; None if it opted out of batch work (or the grid runs none)."""
    if not serves:
        return None
    return own_bps if own_bps is not None else default_bps


def batch_escrow(batch_id: str, consumer: str, amount: int) -> Entry:
    """Move the batch's worst case from the consumer into the batch's escrow."""
    return make_entry(
        f"batch-escrow:{batch_id}",
        Cause("batch", batch_id),
        [Posting(consumer, -amount), Posting(escrow_account(batch_id), amount)],
        "batch escrow",
    )


def batch_refund(batch_id: str, consumer: str, amount: int, state: str) -> Entry:
    """Return what the batch's escrow still holds once it ended in `state`."""
    return make_entry(
        f"batch-refund:{batch_id}",
        Cause("batch", batch_id),
        [Posting(escrow_account(batch_id), -amount), Posting(consumer, amount)],
        f"batch refund ({state})",
    )
