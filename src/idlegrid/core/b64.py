"""Strict base64 for bytes that cross the wire inside JSON (commitments, reports,
checkpoints): anything that is not canonical base64 is a 400 naming its field."""

from __future__ import annotations

import base64
import binascii

from idlegrid.errors import InvalidRequest


def decode(text: str, param: str) -> bytes:
    """`text` as strict base64; InvalidRequest naming `param` otherwise."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"{param} is not base64", param=param) from exc


def encode(data: bytes) -> str:
    """Base64 text for JSON."""
    return base64.b64encode(data).decode()
