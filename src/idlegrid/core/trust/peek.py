"""Reading an encoded commitment's determinism class and grammar engine without decoding
it: the verifier draw needs both for every pending audit, and a full decode would parse
every chunk."""

from __future__ import annotations

import struct

from idlegrid.core.trust.commitment import EMBEDDING_MAGIC, HEAD
from idlegrid.core.trust.extras import decode_extras
from idlegrid.core.trust.schedule import decode as decode_schedule


def peek_class(blob: bytes) -> str:
    """The determinism class of an encoded commitment, without decoding the rest."""
    try:
        (n,) = struct.unpack_from("<H", blob, 0)
        return blob[2 : 2 + n].decode()
    except (struct.error, UnicodeDecodeError):
        return ""


def peek_grammar_engine(blob: bytes) -> str | None:
    """The grammar engine a constrained answer was masked by (e.g. "llguidance/1.9.1"), None
    for an unconstrained one, without decoding the chunks."""
    try:
        (n,) = struct.unpack_from("<H", blob, 0)
        if blob[2 + n : 2 + n + len(EMBEDDING_MAGIC)] == EMBEDDING_MAGIC:
            # An embedding has no grammar; read as an answer's head, its vectors' hash
            # would say "constrained" for some vectors and not others.
            return None
        (head_len,) = struct.unpack_from("<H", blob, 2 + n)
        head = blob[4 + n : 4 + n + head_len]
        (ver,) = struct.unpack_from("<B", head, 0)
        (mlen,) = struct.unpack_from("<H", head, HEAD.size + 32)
        end = HEAD.size + 34 + int(mlen)
        if ver in (2, 4):  # the extras and the schedule come before the constraint
            _, end = decode_extras(head, end)
        if ver in (3, 4):
            n_tokens = HEAD.unpack_from(head, 0)[7]
            _, end = decode_schedule(head, end, n_tokens)
        if len(head) <= end:
            return None
        (elen,) = struct.unpack_from("<H", head, end + 32)
        return head[end + 34 : end + 34 + elen].decode()
    except (struct.error, ValueError, UnicodeDecodeError):
        return None


def peek_constrained(blob: bytes) -> bool:
    """Whether an encoded commitment names a grammar, without decoding the chunks."""
    return peek_grammar_engine(blob) is not None
