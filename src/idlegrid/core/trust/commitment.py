"""Inference commitments: what a provider commits before it learns whether it is audited,
their compact binary encoding, and the verdict on a verifier's recomputation.

A commitment covers the context (prompt + earlier attempts' tokens, hashed), the sampling
parameters and seed, the generated token ids (including an end token that stopped the
answer), and per chunk of `chunk_size` tokens the top-k entries by magnitude of the last
hidden state at the positions that produced those tokens, at serving precision (float32
values, flat uint32 indices `row * hidden + channel`). Chunks are the leaves of a Merkle
tree whose root is in the header; the header's SHA-256 is the digest the audit beacon uses.

Penalties, logit_bias and reported logprobs are committed too (`extras.py`): the header
carries the penalties and bias (the verifier's replay applies them to the committed token
history), and each chunk the log-probabilities the consumer was sent (the verifier
recomputes them within a tolerance). Without them the encoding is version 1, unchanged.

A constrained answer (structured outputs) also commits to its grammar: the SHA-256 of the
canonical schema (`core/grammar.py`) and the grammar engine's name and version, appended to
the header (absent for unconstrained answers, whose encoding is unchanged).

A batched answer (engines/batched) commits its batch schedule (`schedule.py`): the step
shape of every token, which the verifier replays. Version byte: 1 plain, 2 extras, 3 plain
+ schedule, 4 extras + schedule; plus 8 with prompt logprobs (`prompt_lp.py`). Header
layout after the model id: the extras (versions 2 and 4), the schedule (3 and 4), the
prompt logprobs' SHA-256 (flag 8), then the constraint (when bytes remain, in any version).
The prompt logprobs themselves follow the chunks.

Per generated token the fingerprint costs 4 B (token id) + 8·k/chunk_size B (entries):
20 B at the defaults (chunk 16, k 32), plus 4 B per chunk and a ~100 B header.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from idlegrid.core.trust import logprobs as lpm
from idlegrid.core.trust import prompt_lp
from idlegrid.core.trust.extras import Extras, decode_extras, decode_logprobs, encode_logprobs
from idlegrid.core.trust.logprobs import TokenLogprobs
from idlegrid.core.trust.merkle import merkle_root
from idlegrid.core.trust.schedule import Schedule
from idlegrid.core.trust.schedule import decode as decode_schedule
from idlegrid.errors import InvalidRequest

VERSION = 1  # plain answers; 2: with extras (penalties, bias, logprobs)
VERSIONS = (1, 2, 3, 4)
CHUNK_SIZE = 16
TOP_K = 32
MAX_TOKENS = 1 << 16
HEAD = struct.Struct("<B32s32sQffIIB?HHI")  # core/trust/peek.py reads it too


def context_hash(ids: Sequence[int]) -> bytes:
    """SHA-256 of the context token ids as little-endian uint32."""
    return hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).digest()


def class_id(det_class: str) -> bytes:
    """32-byte id of a determinism class string."""
    return hashlib.sha256(det_class.encode()).digest()


def engine_of(det_class: str) -> str:
    """The engine named by a determinism class (its first part)."""
    return det_class.split("/", 1)[0]


def kernel_family(det_class: str) -> str:
    """Engine and device of a class (`engine/version/dtype/device/t<n>`): who may audit whom.

    Only a verifier of the same family reproduces a provider's numbers: across engines, or
    across devices (CPU vs GPU, an AVX2 vs an AVX-512 llama.cpp build), honest answers differ
    by more than a cheaper model does. Version and dtype never narrow the choice: claiming
    another quantization is the cheat an audit exists to catch.
    """
    parts = det_class.split("/")
    return f"{parts[0]}/{parts[3]}" if len(parts) >= 5 else parts[0]


# What follows the determinism class in an embedding commitment (`core/trust/embedding.py`).
EMBEDDING_MAGIC = b"IGEMB1"


def k_for(n_tokens: int, chunk_size: int = CHUNK_SIZE, k: int = TOP_K) -> int:
    """Entries kept for a chunk of `n_tokens` (a short last chunk keeps proportionally fewer)."""
    return max(1, math.ceil(k * n_tokens / chunk_size))


@dataclass(frozen=True)
class Chunk:
    """Tokens of one chunk and the top-k entries of their hidden states."""

    tokens: tuple[int, ...]
    indices: tuple[int, ...]
    values: tuple[float, ...]
    logprobs: tuple[TokenLogprobs, ...] = ()  # per token, when the request asked for them

    def encode(self) -> bytes:
        """`<HH` counts, then uint32 tokens, uint32 indices, float32 values, logprobs."""
        n, k = len(self.tokens), len(self.indices)
        head = struct.pack(f"<HH{n}I{k}I{k}f", n, k, *self.tokens, *self.indices, *self.values)
        return head + encode_logprobs(self.logprobs)


@dataclass(frozen=True)
class Constraint:
    """The grammar an answer was sampled under: its digest and the engine that masked."""

    digest: bytes  # core/grammar.GrammarSpec.digest(), 32 bytes
    engine: str  # e.g. "llguidance/1.9.1"

    def encode(self) -> bytes:
        """32-byte digest, then the engine string (length-prefixed UTF-8)."""
        eng = self.engine.encode()
        return self.digest + struct.pack("<H", len(eng)) + eng


@dataclass(frozen=True)
class Header:
    """Everything committed about one answer except the chunks themselves (root covers them)."""

    model: str
    det_class: str
    context_hash: bytes
    seed: int
    temperature: float
    top_p: float
    start: int  # absolute position of the first generated token (= context length)
    n_tokens: int
    finish_reason: str  # "stop" or "length"
    ended_by_end_token: bool  # the last committed token is the end token that stopped it
    hidden: int
    root: bytes
    chunk_size: int = CHUNK_SIZE
    k: int = TOP_K
    version: int = VERSION
    extras: Extras = field(default_factory=Extras)
    constraint: Constraint | None = None
    schedule: Schedule | None = None  # batched answers: each token's (batch size, row)
    prompt_digest: bytes | None = None  # echo with logprobs: the prompt logprobs' SHA-256

    def encode(self) -> bytes:
        """Fixed binary layout, the model id (length-prefixed UTF-8), then the extras, the
        schedule and the constraint, each where present (module docstring)."""
        model = self.model.encode()
        return (
            HEAD.pack(
                _version(self.extras, self.schedule, self.prompt_digest),
                self.context_hash,
                class_id(self.det_class),
                self.seed & ((1 << 64) - 1),
                self.temperature,
                self.top_p,
                self.start,
                self.n_tokens,
                1 if self.finish_reason == "stop" else 0,
                self.ended_by_end_token,
                self.chunk_size,
                self.k,
                self.hidden,
            )
            + self.root
            + struct.pack("<H", len(model))
            + model
            + self.extras.encode()
            + (self.schedule.encode() if self.schedule is not None else b"")
            + (self.prompt_digest or b"")
            + (self.constraint.encode() if self.constraint is not None else b"")
        )

    def digest(self) -> bytes:
        """What audit selection and the provider's signature bind to."""
        return hashlib.sha256(b"idlegrid-commitment" + self.encode()).digest()


@dataclass(frozen=True)
class Commitment:
    """A header and its chunks."""

    header: Header
    chunks: tuple[Chunk, ...]
    prompt: prompt_lp.PromptLogprobs | None = None  # echo with logprobs

    @property
    def tokens(self) -> list[int]:
        """All committed token ids, in order."""
        return [t for c in self.chunks for t in c.tokens]

    def encode(self) -> bytes:
        """Wire form: det_class (length-prefixed), header, then the chunks."""
        cls = self.header.det_class.encode()
        head = self.header.encode()
        return (
            struct.pack("<H", len(cls))
            + cls
            + struct.pack("<H", len(head))
            + head
            + b"".join(c.encode() for c in self.chunks)
            + (self.prompt.encode() if self.prompt is not None else b"")
        )

    def fingerprint_bytes(self) -> int:
        """Bytes of the chunks alone (the per-token part of the proof)."""
        return sum(len(c.encode()) for c in self.chunks)


def build(
    model: str,
    det_class: str,
    context_ids: Sequence[int],
    seed: int,
    temperature: float,
    top_p: float,
    tokens: Sequence[int],
    entries: Sequence[tuple[Sequence[int], Sequence[float]]],
    finish_reason: str,
    ended_by_end_token: bool,
    hidden: int,
    chunk_size: int = CHUNK_SIZE,
    k: int = TOP_K,
    extras: Extras | None = None,
    logprobs: Sequence[TokenLogprobs] = (),
    constraint: Constraint | None = None,
    schedule: Schedule | None = None,
    prompt: prompt_lp.PromptLogprobs | None = None,
) -> Commitment:
    """Assemble a commitment from tokens and per-chunk top-k (indices, values), with the
    logprobs of every token when `extras.top_logprobs` ≥ 0 (and a batched answer's
    `schedule`, one shape per token)."""
    if schedule is not None and len(schedule.shapes) != len(tokens):
        raise ValueError(f"{len(schedule.shapes)} batch shapes for {len(tokens)} tokens")
    extras = extras or Extras()
    n_chunks = math.ceil(len(tokens) / chunk_size)
    if len(entries) != n_chunks:
        raise ValueError(f"{len(entries)} chunk fingerprints for {n_chunks} chunks")
    if extras.top_logprobs >= 0 and (
        len(logprobs) != len(tokens) or any(len(lp.top) != extras.top_logprobs for lp in logprobs)
    ):
        raise ValueError(f"{len(logprobs)} logprobs for {len(tokens)} tokens")
    chunks = tuple(
        Chunk(
            tuple(int(t) for t in tokens[j * chunk_size : (j + 1) * chunk_size]),
            tuple(int(i) for i in idx),
            tuple(float(v) for v in val),
            tuple(logprobs[j * chunk_size : (j + 1) * chunk_size])
            if extras.top_logprobs >= 0
            else (),
        )
        for j, (idx, val) in enumerate(entries)
    )
    root = merkle_root([c.encode() for c in chunks])
    header = Header(
        model,
        det_class,
        context_hash(context_ids),
        seed,
        temperature,
        top_p,
        len(context_ids),
        len(tokens),
        finish_reason,
        ended_by_end_token,
        hidden,
        root,
        chunk_size,
        k,
        _version(extras, schedule, prompt.digest() if prompt else None),
        extras,
        constraint,
        schedule,
        prompt.digest() if prompt is not None else None,
    )
    return Commitment(header, chunks, prompt)


def _version(extras: Extras, schedule: Schedule | None, prompt_digest: bytes | None) -> int:
    base = (1 if extras.neutral else 2) + (2 if schedule is not None else 0)
    return base + (8 if prompt_digest is not None else 0)


def decode(blob: bytes) -> Commitment:
    """Parse a wire commitment; any malformation is InvalidRequest (a 400, never a 500)."""
    try:
        return _decode(blob)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise InvalidRequest(f"malformed commitment: {exc}", param="commitment") from exc


def _decode(blob: bytes) -> Commitment:
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(blob):
            raise ValueError("truncated")
        out = blob[pos : pos + n]
        pos += n
        return out

    (cls_len,) = struct.unpack("<H", take(2))
    det_class = take(cls_len).decode()
    (head_len,) = struct.unpack("<H", take(2))
    head = take(head_len)
    fields = HEAD.unpack_from(head, 0)
    (ver, ctx, cls_hash, seed, temp, top_p, start, n_tokens, stop, ended, chunk_size, k, hidden) = (
        fields
    )
    has_prompt, ver = bool(ver & 8), ver & ~8
    if ver not in VERSIONS:
        raise ValueError(f"version {ver}")
    if cls_hash != class_id(det_class):
        raise ValueError("determinism class does not match its id")
    root = head[HEAD.size : HEAD.size + 32]
    (mlen,) = struct.unpack_from("<H", head, HEAD.size + 32)
    model = head[HEAD.size + 34 : HEAD.size + 34 + mlen].decode()
    end = HEAD.size + 34 + mlen
    extras = Extras()
    if ver in (2, 4):
        extras, end = decode_extras(head, end)
    schedule = None
    if ver in (3, 4):
        schedule, end = decode_schedule(head, end, n_tokens)
    prompt_digest = None
    if has_prompt:
        prompt_digest, end = head[end : end + 32], end + 32
    constraint = None
    if len(head) > end:  # a constrained answer: digest, then the grammar engine
        if len(head) < end + 34:
            raise ValueError("constraint length")
        (elen,) = struct.unpack_from("<H", head, end + 32)
        constraint = Constraint(head[end : end + 32], head[end + 34 : end + 34 + elen].decode())
        end += 34 + elen
    if end != len(head) or len(root) != 32:
        raise ValueError("header length")
    if not 1 <= chunk_size <= 4096 or not 1 <= k <= 65535 or n_tokens > MAX_TOKENS:
        raise ValueError("chunking out of range")
    chunks = []
    remaining = n_tokens
    while remaining > 0:
        n, kk = struct.unpack("<HH", take(4))
        if n != min(chunk_size, remaining) or kk != k_for(n, chunk_size, k):
            raise ValueError("chunk shape")
        toks = struct.unpack(f"<{n}I", take(4 * n))
        idx = struct.unpack(f"<{kk}I", take(4 * kk))
        val = struct.unpack(f"<{kk}f", take(4 * kk))
        if any(i >= n * hidden for i in idx) or len(set(idx)) != kk:
            raise ValueError("index out of range or repeated")
        if not all(math.isfinite(v) for v in val):
            raise ValueError("non-finite value")
        lps: tuple[TokenLogprobs, ...] = ()
        if extras.top_logprobs >= 0:
            lps = decode_logprobs(take, toks, extras.top_logprobs)
            if not all(lp.logprob <= 0 and all(v <= 0 for _, v in lp.top) for lp in lps):
                raise ValueError("a log-probability above 0 or not a number")
        chunks.append(Chunk(toks, idx, val, lps))
        remaining -= n
    prompt = prompt_lp.decode(take) if has_prompt else None
    if prompt is not None and prompt.digest() != prompt_digest:
        raise ValueError("prompt logprobs do not match the committed digest")
    if pos != len(blob):
        raise ValueError("trailing bytes")
    header = Header(
        model,
        det_class,
        ctx,
        seed,
        temp,
        top_p,
        start,
        n_tokens,
        "stop" if stop else "length",
        bool(ended),
        hidden,
        root,
        chunk_size,
        k,
        ver + (8 if has_prompt else 0),
        extras,
        constraint,
        schedule,
        prompt_digest,
    )
    if merkle_root([c.encode() for c in chunks]) != root:
        raise ValueError("chunks do not match the committed root")
    return Commitment(header, tuple(chunks), prompt)


# ---- the verifier's recomputation and the verdict ------------------------------------


@dataclass(frozen=True)
class ChunkReport:
    """What the verifier recomputed for one chunk: its own numbers, not a yes/no."""

    values: tuple[float, ...]  # the verifier's hidden-state values at the committed indices
    kth: float  # the verifier's k-th largest |value| in the chunk
    margins: tuple[float, ...]  # per token: committed token's seeded score minus the best other
    allowed: tuple[bool, ...]  # per token: inside the nucleus
    # Per token, when logprobs were committed: the verifier's values at the committed ids.
    logprobs: tuple[lpm.Recheck, ...] = ()


@dataclass(frozen=True)
class Report:
    """A verifier's full recomputation of one commitment."""

    context_hash: bytes
    chunks: tuple[ChunkReport, ...]
    end_ok: bool  # the finish claim holds (end token is an end token, stop string present,
    #              or the length limit was reached)
    det_class: str = ""
    # The context length the verifier derived from what the coordinator sent (−1: a report
    # from before it was sent). The header's `start` must equal it: billing reads `start`.
    context_len: int = -1
    # Echo with logprobs: the verifier's values at each committed prompt position.
    prompt: tuple[lpm.Recheck, ...] = ()


def context_faults(h: Header, report: Report) -> list[str]:
    """Why a recomputation's context is not the committed one (hash, or length)."""
    if report.context_hash != h.context_hash:
        return ["context hash differs: the answer is for another prompt"]
    if report.context_len >= 0 and report.context_len != h.start:
        return [f"context is {report.context_len} tokens but the commitment says {h.start}"]
    return []


def constraint_faults(h: Header, expected: bytes | None) -> list[str]:
    """Why a commitment's grammar is not the one the request asked for (empty: it is)."""
    got = h.constraint.digest if h.constraint is not None else None
    if got == expected:
        return []
    if expected is None:
        return ["commitment names a grammar the request did not ask for"]
    if got is None:
        return ["commitment names no grammar but the request asked for one"]
    return ["commitment names another grammar than the request's"]


@dataclass(frozen=True)
class Tolerance:
    """Thresholds for one (provider class, verifier class) pair; see docs/trust.md."""

    rel: float  # largest relative error of a committed value
    rank_slack: float  # a committed |value| may sit this fraction below the verifier's k-th
    margin: float  # a committed token may trail the best seeded score by this much
    top_p_slack: float = 1e-4
    logprob: float = 1e-2  # a reported log-probability may be off by this much (nats)


EXACT = Tolerance(rel=0.0, rank_slack=0.0, margin=0.0, top_p_slack=0.0, logprob=0.0)


@dataclass(frozen=True)
class Verdict:
    """Outcome of judging one report against one commitment."""

    passed: bool
    reasons: tuple[str, ...]
    worst_rel: float
    worst_margin: float
    first_bad_chunk: int | None = None
    stats: dict[str, float] = field(default_factory=dict)


def judge(c: Commitment, report: Report, tol: Tolerance, max_new_tokens: int) -> Verdict:
    """Compare a verifier's recomputation with a commitment; pure, so anyone can re-judge."""
    h = c.header
    reasons = context_faults(h, report)
    if h.n_tokens > max_new_tokens + (1 if h.ended_by_end_token else 0):
        reasons.append(f"{h.n_tokens} tokens committed but at most {max_new_tokens} allowed")
    if not report.end_ok:
        reasons.append(f"finish reason '{h.finish_reason}' is not what the model did")
    reasons.extend(prompt_lp.faults(c.prompt, report.prompt, tol.logprob))
    if len(report.chunks) != len(c.chunks):
        reasons.append("report covers a different number of chunks")
        return Verdict(False, tuple(reasons), math.inf, -math.inf, 0)
    worst_rel, worst_margin, first_bad = 0.0, math.inf, None
    for j, (cc, rc) in enumerate(zip(c.chunks, report.chunks, strict=True)):
        faults = chunk_faults(j, cc, rc, tol)
        reasons.extend(faults)
        if len(rc.values) == len(cc.values) and len(rc.margins) == len(cc.tokens):
            for v, w in zip(cc.values, rc.values, strict=True):
                err = abs(v - w) / abs(v) if v != 0 else (0.0 if w == 0 else math.inf)
                worst_rel = max(worst_rel, err if math.isfinite(w) else math.inf)
            worst_margin = min([worst_margin, *rc.margins])
        if faults and first_bad is None:
            first_bad = j
    passed = not reasons
    return Verdict(
        passed,
        tuple(reasons),
        worst_rel,
        worst_margin,
        first_bad,
        {"worst_rel": worst_rel, "worst_margin": worst_margin},
    )


def chunk_faults(j: int, cc: Chunk, rc: ChunkReport, tol: Tolerance) -> list[str]:
    """Why chunk j of a commitment disagrees with a recomputation of it (empty: it agrees)."""
    if (
        len(rc.values) != len(cc.values)
        or len(rc.margins) != len(cc.tokens)
        or len(rc.allowed) != len(cc.tokens)
    ):
        return [f"chunk {j}: report has the wrong shape"]
    reasons = []
    low = [v for v in cc.values if abs(v) < (1 - tol.rank_slack) * rc.kth]
    if low:
        reasons.append(f"chunk {j}: {len(low)} committed entries are not in the top-k")
    if any(not ok for ok in rc.allowed):
        reasons.append(f"chunk {j}: a token lies outside the nucleus")
    if any(m < -tol.margin or math.isnan(m) for m in rc.margins):
        reasons.append(f"chunk {j}: a token is not the one the seed samples")
    if cc.logprobs:
        if len(rc.logprobs) != len(cc.logprobs):
            reasons.append(f"chunk {j}: report has no logprobs for every token")
        else:
            found = {f for lp, r in zip(cc.logprobs, rc.logprobs, strict=True)
                     for f in lpm.faults(lp, r, tol.logprob)}  # fmt: skip
            reasons.extend(f"chunk {j}: {f}" for f in sorted(found))
    chunk_rel = max(
        (abs(v - w) / abs(v) if v else math.inf) for v, w in zip(cc.values, rc.values, strict=True)
    )
    if not chunk_rel <= tol.rel:
        reasons.append(f"chunk {j}: hidden state off by {chunk_rel:.3g} (> {tol.rel:g})")
    return reasons
