"""Leases of whole machines (or GPUs of them), pure: the lifecycle and what it bills."""
