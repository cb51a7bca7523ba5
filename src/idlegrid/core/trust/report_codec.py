"""A verifier's report on the wire: the binary form of `commitment.Report` (what the
verifier recomputed, sent to the coordinator and to dispute referees)."""

from __future__ import annotations

import struct
from dataclasses import replace

from idlegrid.core.trust import logprobs as lpm
from idlegrid.core.trust.commitment import MAX_TOKENS, ChunkReport, Report
from idlegrid.errors import InvalidRequest


def encode_report(r: Report) -> bytes:
    """Binary report: context hash, end flag, class, then per chunk values/kth/margins/allowed,
    then the context length (int32; absent in reports from before it was sent), the
    logprob rechecks and the prompt logprob rechecks (each only when there are any)."""
    cls = r.det_class.encode()
    out = [
        r.context_hash,
        struct.pack("<?H", r.end_ok, len(cls)),
        cls,
        struct.pack("<I", len(r.chunks)),
    ]
    for ch in r.chunks:
        k, n = len(ch.values), len(ch.margins)
        out.append(
            struct.pack(f"<HH{k}ff{n}f{n}?", k, n, *ch.values, ch.kth, *ch.margins, *ch.allowed)
        )
    out.append(struct.pack("<i", r.context_len))
    # Absent unless logprobs were committed; present (maybe empty) before prompt logprobs.
    if r.prompt or any(ch.logprobs for ch in r.chunks):
        out.append(lpm.encode_rechecks([ch.logprobs for ch in r.chunks]))
    if r.prompt:
        out.append(lpm.encode_rechecks([r.prompt]))
    return b"".join(out)


def decode_report(blob: bytes) -> Report:
    """Parse a verifier's report; malformed input is InvalidRequest."""
    try:
        pos = 35
        ctx = blob[:32]
        end_ok, cls_len = struct.unpack_from("<?H", blob, 32)
        det_class = blob[pos : pos + cls_len].decode()
        pos += cls_len
        (n_chunks,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if n_chunks > MAX_TOKENS or len(ctx) != 32:
            raise ValueError("too many chunks")
        chunks = []
        for _ in range(n_chunks):
            k, n = struct.unpack_from("<HH", blob, pos)
            pos += 4
            fmt = f"<{k}ff{n}f{n}?"
            vals = struct.unpack_from(fmt, blob, pos)
            pos += struct.calcsize(fmt)
            chunks.append(
                ChunkReport(
                    tuple(vals[:k]),
                    vals[k],
                    tuple(vals[k + 1 : k + 1 + n]),
                    tuple(bool(a) for a in vals[k + 1 + n :]),
                )
            )
        context_len = -1
        if pos + 4 <= len(blob):
            (context_len,) = struct.unpack_from("<i", blob, pos)
            pos += 4
        if pos < len(blob):
            rows, pos = lpm.decode_rechecks(blob, pos, len(chunks))
            chunks = [replace(ch, logprobs=lp) for ch, lp in zip(chunks, rows, strict=True)]
        prompt: tuple[lpm.Recheck, ...] = ()
        if pos < len(blob):
            (prompt,), pos = lpm.decode_rechecks(blob, pos, 1)
        if pos != len(blob) or context_len < -1:
            raise ValueError("trailing bytes")
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"malformed audit report: {exc}", param="report") from exc
    return Report(ctx, tuple(chunks), bool(end_ok), det_class, context_len, prompt)
