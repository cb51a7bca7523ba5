"""Embedding answers in the audit lifecycle: the checks at finish, the audited request as
the verifier sees it, and the verdict on its recomputation. Everything else (the beacon,
the draw of a verifier, the consequences of a verdict) is the lifecycle every answer has."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import embedding as emb
from idlegrid.errors import InvalidRequest

if TYPE_CHECKING:
    from idlegrid.coordinator.trust.settings import TrustSettings
    from idlegrid.coordinator.views import TaskView


def check_commitment(task: TaskView, raw: bytes, finish_reason: str) -> emb.EmbeddingCommitment:
    """Decode an embeddings answer's commitment and check it against the request (400 if it
    does not fit it: the attempt is then unpaid and handed on, as for any answer)."""
    if task.kind != "embedding":
        raise InvalidRequest("an embedding commitment for a generation", param="commitment")
    c = emb.decode(raw)
    inputs = task.payload["input"]
    h = c.header
    if h.model != task.model_id or h.seed != task.payload["seed"] or finish_reason != "stop":
        raise InvalidRequest(
            "commitment model, seed or finish reason differs from the request",
            param="commitment",
        )
    if len(h.token_counts) != len(inputs):
        raise InvalidRequest(
            f"commitment covers {len(h.token_counts)} inputs, the request has {len(inputs)}",
            param="commitment",
        )
    dims = task.payload.get("dimensions")
    if dims is not None and h.dims != dims:
        raise InvalidRequest(f"vectors have {h.dims} dimensions, not {dims}", param="commitment")
    for i, item in enumerate(inputs):
        # Token-id inputs are checkable here; text is checked by the audit's recomputation.
        if not isinstance(item, str) and cm.context_hash(item) != h.context_hashes[i]:
            raise InvalidRequest(f"commitment hashes input {i} wrongly", param="commitment")
    return c


def tolerance(settings: TrustSettings) -> emb.EmbeddingTolerance:
    """The calibrated tolerance (docs/trust.md): one for every pair of a kernel family."""
    return emb.EmbeddingTolerance(abs=settings.embed_abs, cos=settings.embed_cos)


def judge(
    settings: TrustSettings, blob: bytes, report_raw: bytes
) -> tuple[cm.Verdict, dict[str, Any]]:
    """The verdict on a verifier's recomputation, and the fields the audit row records."""
    c = emb.decode(blob)
    report = emb.decode_report(report_raw)
    tol = tolerance(settings)
    v = emb.judge(c, report, tol)
    worst_cos = v.worst_margin if abs(v.worst_margin) != float("inf") else None
    fields = {
        "kind": "embedding",
        "worst_rel": v.worst_rel,
        "worst_margin": worst_cos,
        "first_bad_chunk": v.first_bad_chunk,
        "worst_abs": v.worst_rel,
        "worst_cos": worst_cos,
        "first_bad_input": v.first_bad_chunk,
        "tolerance": tol.abs,
        "tolerance_cos": tol.cos,
        "provider_class": c.header.det_class,
        "verifier_class": report.det_class,
    }
    return v, fields
