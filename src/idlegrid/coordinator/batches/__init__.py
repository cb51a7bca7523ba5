"""Batches (`/v1/batches`): OpenAI's Batch API run as ordinary grid work (docs/batch.md)."""
