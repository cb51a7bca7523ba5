"""Batches (OpenAI's Batch API), the pure part: the lifecycle, the request counts, the
input line rules. Execution on the grid comes later (docs/batch.md)."""
