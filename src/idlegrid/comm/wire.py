"""Messages between training peers as data, never code: a JSON header and raw array bytes.

Peers used to exchange pickles, and unpickling bytes from a TCP peer runs whatever code
the peer chose. This encoding carries only what the pipeline sends (dicts, lists, numbers,
strings, None and numpy arrays of a few numeric dtypes); decoding checks every array's
dtype, shape and byte count against the header and the buffer before it touches them.

    b"IGW1" | u32 header length | header JSON | array bytes, in header order
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

MAGIC = b"IGW1"
_LEN = struct.Struct("!I")
DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
MAX_HEADER = 1 << 20


class WireError(ValueError):
    """Bytes that are not a well-formed message."""


def encode(obj: Any) -> bytes:
    """The message for `obj` (arrays are copied out as C-contiguous bytes)."""
    buffers: list[bytes] = []

    def walk(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            if v.dtype.name not in DTYPES:
                raise WireError(f"dtype {v.dtype.name} is not sent")
            buffers.append(np.ascontiguousarray(v).tobytes())
            return {"$a": len(buffers) - 1, "dtype": v.dtype.name, "shape": list(v.shape)}
        if isinstance(v, dict):
            if any(not isinstance(k, str) or k == "$a" for k in v):
                raise WireError("dict keys must be strings other than '$a'")
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x) for x in v]
        if v is None or isinstance(v, bool | int | float | str):
            return v
        raise WireError(f"{type(v).__name__} is not sent")

    header = json.dumps(walk(obj), separators=(",", ":"), allow_nan=False).encode()
    return MAGIC + _LEN.pack(len(header)) + header + b"".join(buffers)


def decode(data: bytes) -> Any:
    """The object a message carries; WireError for anything malformed."""
    if data[:4] != MAGIC or len(data) < 8:
        raise WireError("not an idlegrid wire message")
    (n,) = _LEN.unpack_from(data, 4)
    if n > MAX_HEADER or 8 + n > len(data):
        raise WireError("header length out of range")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise WireError("header is not JSON") from exc
    body = memoryview(data)[8 + n :]
    offset = 0
    expected = 0

    def walk(v: Any) -> Any:
        nonlocal offset, expected
        if isinstance(v, dict) and "$a" in v:
            dtype, shape = v.get("dtype"), v.get("shape")
            if (
                v["$a"] != expected
                or dtype not in DTYPES
                or not isinstance(shape, list)
                or not all(isinstance(d, int) and d >= 0 for d in shape)
            ):
                raise WireError("bad array descriptor")
            expected += 1
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if offset + size > len(body):
                raise WireError("array bytes past the end of the message")
            arr = np.frombuffer(body[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
            return arr.copy()  # writable, and independent of the receive buffer
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    out = walk(header)
    if offset != len(body):
        raise WireError("trailing bytes after the last array")
    return out
