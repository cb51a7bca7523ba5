"""Logprobs as OpenAI shapes them, from what providers upload (protocol LogprobMsg dicts:
`lp`, `bytes` hex, `top` [[id, lp, bytes hex]]); the values themselves are committed and
audited (core/trust/logprobs.py says which distribution they are)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _token(raw: bytes) -> str:
    # A token may hold part of a UTF-8 character; `bytes` carries it exactly.
    return raw.decode("utf-8", errors="replace")


def chat(lps: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """`logprobs` of a chat choice or chunk: one entry per token."""
    content = []
    for lp in lps:
        if lp is None:
            continue
        raw = bytes.fromhex(lp["bytes"])
        top = []
        for _, value, hexed in lp["top"]:
            alt = bytes.fromhex(hexed)
            top.append({"token": _token(alt), "logprob": value, "bytes": list(alt)})
        content.append(
            {"token": _token(raw), "logprob": lp["lp"], "bytes": list(raw), "top_logprobs": top}
        )
    return {"content": content, "refusal": None}


def completion(lps: Sequence[dict[str, Any] | None], offset: int) -> tuple[dict[str, Any], int]:
    """`logprobs` of a completion choice or chunk whose first token starts at character
    `offset` of the choice's text; and the offset after its tokens."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for lp in lps:
        if lp is None:
            continue
        token = _token(bytes.fromhex(lp["bytes"]))
        out["tokens"].append(token)
        out["token_logprobs"].append(lp["lp"])
        # null for a prompt's first token, which has no log-probability (echo)
        top = lp["top"]
        out["top_logprobs"].append(
            None if top is None else {_token(bytes.fromhex(h)): v for _, v, h in top}
        )
        out["text_offset"].append(offset)
        offset += len(token)
    return out, offset
