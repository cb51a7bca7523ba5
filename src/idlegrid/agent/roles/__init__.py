"""What an agent does besides serving: audits, training, hardware proofs, disputes."""
