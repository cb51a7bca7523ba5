"""Pure trust maths: commitments, Merkle trees, audit selection, economics, reputation,
seeded sampling, hardware challenges, disputes and the ledger entries they cause.

No I/O, no clock, no randomness of its own: callers pass beacons, seeds and measurements.
"""
