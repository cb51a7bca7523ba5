"""Verified training, pure: job spec, per-step proofs, verdicts, disputes, settlement."""
