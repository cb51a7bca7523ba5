"""The pure domain: no I/O, no web framework, no database, no torch.

Clock and randomness are injected."""
