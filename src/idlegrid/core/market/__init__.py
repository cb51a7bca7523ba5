"""The market, pure: hardware descriptors, resource specs, offers, orders, matching, settlement.

spec.py       what a consumer asks for (SkyPilot resources, Vast-style filters)
hardware.py   what a provider has (canonical GPU models, measured speed, region)
offers.py     what a provider charges (per-token and per-device-hour prices, plug-ins)
orders.py     what a consumer buys and where it stands (enumerated lifecycle)
auction.py    the book as columns (10,000 offers per order in microseconds) and the
              reverse auction: filter with reasons, fit, score, gang placement
settlement.py escrow, accruals, payouts, stakes, SLO refunds, slashes as ledger entries
"""
