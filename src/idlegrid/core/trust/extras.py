"""What a commitment adds for penalties, logit_bias and logprobs, and its binary form.

A header whose extras are neutral (no penalty, no bias, no logprobs) encodes exactly as
before (commitment version 1), so plain answers cost and hash what they always did. Else
the header is version 2 and carries, after the model id: presence and frequency penalty
(float32), the number of context tokens that are this choice's earlier output (`n_prior`:
a failover continues a choice whose penalties count them), the committed top-logprob
count (int8, -1 for none) and the bias entries (uint32 id, float32 value). Each chunk of a
commitment with logprobs then ends with, per token, the sampled token's log-probability
(float32), then per token its k alternatives (uint32 id, float32 log-probability).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from idlegrid.core.trust.adjust import MAX_BIAS_TOKENS, Adjust
from idlegrid.core.trust.logprobs import MAX_TOP, TokenLogprobs

_EXTRAS = struct.Struct("<ffIbH")


@dataclass(frozen=True)
class Extras:
    """The sampler settings beyond seed/temperature/top_p that an answer was made with."""

    adjust: Adjust = field(default_factory=Adjust)
    n_prior: int = 0  # trailing context tokens that are this choice's earlier output
    top_logprobs: int = -1  # alternatives committed per token; -1: no logprobs at all

    @property
    def neutral(self) -> bool:
        """Nothing beyond version 1 to commit."""
        return self.adjust.neutral and self.top_logprobs < 0

    def encode(self) -> bytes:
        """The binary form (empty when neutral)."""
        if self.neutral:
            return b""
        a = self.adjust
        out = [_EXTRAS.pack(a.presence, a.frequency, self.n_prior, self.top_logprobs, len(a.bias))]
        out.extend(struct.pack("<If", t, b) for t, b in a.bias)
        return b"".join(out)


def decode_extras(buf: bytes, pos: int) -> tuple[Extras, int]:
    """Extras at `pos` of a version-2 header, and the position after them."""
    presence, frequency, n_prior, top, n_bias = _EXTRAS.unpack_from(buf, pos)
    pos += _EXTRAS.size
    if n_bias > MAX_BIAS_TOKENS or not -1 <= top <= MAX_TOP:
        raise ValueError("extras out of range")
    bias = tuple(struct.iter_unpack("<If", buf[pos : pos + 8 * n_bias]))
    if len(bias) != n_bias:
        raise ValueError("truncated bias")
    pos += 8 * n_bias
    ids = [t for t, _ in bias]
    if ids != sorted(set(ids)):
        raise ValueError("bias ids not ascending")
    extras = Extras(Adjust(presence, frequency, tuple(bias)), n_prior, top)
    if extras.neutral:
        raise ValueError("version 2 header with neutral extras")
    return extras, pos


def encode_logprobs(lps: Sequence[TokenLogprobs]) -> bytes:
    """A chunk's logprob section (see the module docstring)."""
    if not lps:
        return b""
    n = len(lps)
    head = struct.pack(f"<{n}f", *(lp.logprob for lp in lps))
    tops = [x for lp in lps for pair in lp.top for x in pair]
    k = len(lps[0].top)
    return head + struct.pack("<" + "If" * (n * k), *tops) if k else head


def decode_logprobs(
    take: Callable[[int], bytes], tokens: Sequence[int], k: int
) -> tuple[TokenLogprobs, ...]:
    """A chunk's logprob section for `tokens` with `k` alternatives each."""
    n = len(tokens)
    values = struct.unpack(f"<{n}f", take(4 * n))
    flat = struct.unpack("<" + "If" * (n * k), take(8 * n * k)) if k else ()
    out = []
    for r, (tok, v) in enumerate(zip(tokens, values, strict=True)):
        pairs = flat[2 * k * r : 2 * k * (r + 1)]
        top = tuple((int(pairs[2 * i]), float(pairs[2 * i + 1])) for i in range(k))
        out.append(TokenLogprobs(int(tok), float(v), top))
    return tuple(out)


def expected(
    presence: float | None,
    frequency: float | None,
    bias: dict[str, float] | None,
    top_logprobs: int | None,
    n_prior: int,
) -> Extras:
    """The extras a commitment for this request must carry (AdjustError if out of range)."""
    from idlegrid.core.trust.adjust import make

    a = make(presence, frequency, bias)
    top = -1 if top_logprobs is None else top_logprobs
    return Extras(a, n_prior if a.penalised else 0, top)
