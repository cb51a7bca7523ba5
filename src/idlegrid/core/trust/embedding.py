"""Embedding commitments: the vectors a provider returns, fixed before the audit beacon, and
the verdict on a verifier's recomputation of them.

An embedding answer is small and final (no sampling, no stream), so the commitment carries
the vectors themselves at serving precision (float32): the coordinator answers the consumer
from the commitment, so what was paid for and what can be audited are the same bytes. The
header fixes the model, the determinism class, each input's token ids (hashed) and count
(billing reads them) and the vectors' SHA-256; its own SHA-256 is the beacon's digest.

Layout: det_class length-prefixed first (as inference commitments, so `peek_class` works),
then `MAGIC`, the header, then n·dims float32 little-endian.

Also here, pure numpy: mean pooling and L2 normalisation as sentence-transformers does them,
shared by every engine that embeds.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from idlegrid.core.trust.commitment import EMBEDDING_MAGIC, Commitment, Verdict, context_hash
from idlegrid.errors import InvalidRequest

MAGIC = EMBEDDING_MAGIC
MAX_INPUTS = 256  # per request; keeps a commitment of 640-dim vectors under the 1 MiB wire cap
MAX_DIMS = 8192
_HEAD = struct.Struct("<HIIQ32s")  # model length, inputs, dims, seed, vectors' SHA-256


# ---- pooling ---------------------------------------------------------------------------


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of each row's token states over its attention mask ([b, t, d], [b, t] -> [b, d])."""
    m = mask.astype(np.float32)[:, :, None]
    summed = (hidden.astype(np.float32) * m).sum(axis=1)
    # sentence-transformers clamps the count at 1e-9 so an all-padding row gives zeros.
    counts = np.maximum(m.sum(axis=1), 1e-9)
    out: np.ndarray = (summed / counts).astype(np.float32)
    return out


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero, as torch's F.normalize leaves it)."""
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    out: np.ndarray = (x / norms).astype(np.float32)
    return out


# ---- the commitment --------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingHeader:
    """What an embedding commitment fixes besides the vectors."""

    det_class: str
    model: str
    dims: int
    context_hashes: tuple[bytes, ...]  # per input: SHA-256 of its token ids
    token_counts: tuple[int, ...]
    vectors_hash: bytes
    # The request's seed (derived from its task id): binds the commitment to one request,
    # so two requests with the same inputs have distinct digests, hence distinct audits.
    seed: int = 0

    @property
    def start(self) -> int:
        """Tokens processed: what is billed (the name matches inference headers)."""
        return sum(self.token_counts)

    def encode(self) -> bytes:
        """Binary header (after the length-prefixed class and the magic)."""
        model = self.model.encode()
        n = len(self.token_counts)
        return b"".join(
            [
                _HEAD.pack(len(model), n, self.dims, self.seed, self.vectors_hash),
                model,
                struct.pack(f"<{n}I", *self.token_counts),
                *self.context_hashes,
            ]
        )

    def digest(self) -> bytes:
        """SHA-256 of class, magic and header: what the audit beacon hashes."""
        cls = self.det_class.encode()
        return hashlib.sha256(struct.pack("<H", len(cls)) + cls + MAGIC + self.encode()).digest()


@dataclass(frozen=True)
class EmbeddingCommitment:
    """A provider's commitment to one embeddings answer: header and vectors ([n, dims])."""

    header: EmbeddingHeader
    vectors: np.ndarray
    chunks: tuple[()] = ()  # no generated tokens: nothing for a token-level canary to tamper

    def encode(self) -> bytes:
        """Wire form: class (length-prefixed), magic, header, float32 vectors."""
        cls = self.header.det_class.encode()
        body = np.ascontiguousarray(self.vectors, dtype="<f4").tobytes()
        return struct.pack("<H", len(cls)) + cls + MAGIC + self.header.encode() + body


AnyCommitment = Commitment | EmbeddingCommitment


def vectors_hash(vectors: np.ndarray) -> bytes:
    """SHA-256 of the vectors as float32 little-endian."""
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).digest()


def tamper(c: EmbeddingCommitment) -> EmbeddingCommitment:
    """A "values" canary of an embeddings answer: its first vector turned by ~1 % towards a
    direction drawn from the header's digest, renormalised, the vectors' hash recomputed
    (a consistent blob: only a recomputation tells it from an honest one). An honest
    verifier's vectors then miss it by far more than the tolerance; one that echoes the
    commitment approves it."""
    v = np.array(c.vectors, dtype=np.float32, copy=True)
    if v.size == 0:
        return c
    rng = np.random.default_rng(int.from_bytes(c.header.digest()[:8], "little"))
    push = rng.standard_normal(v.shape[1])
    push = push / float(np.linalg.norm(push))
    row = v[0].astype(np.float64)
    scale = float(np.linalg.norm(row)) or 1.0
    moved = row + 0.01 * scale * push
    v[0] = (moved * (scale / float(np.linalg.norm(moved)))).astype(np.float32)
    header = dataclasses.replace(c.header, vectors_hash=vectors_hash(v))
    return EmbeddingCommitment(header, v)


def build(
    model: str,
    det_class: str,
    inputs: Sequence[Sequence[int]],
    vectors: np.ndarray,
    seed: int = 0,
) -> EmbeddingCommitment:
    """Commit to `vectors`, the embeddings of the token-id `inputs`, row by row."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] != len(inputs):
        raise ValueError(f"{v.shape} vectors for {len(inputs)} inputs")
    header = EmbeddingHeader(
        det_class,
        model,
        int(v.shape[1]),
        tuple(context_hash(ids) for ids in inputs),
        tuple(len(ids) for ids in inputs),
        vectors_hash(v),
        seed,
    )
    return EmbeddingCommitment(header, v)


def _class_and_rest(blob: bytes) -> tuple[str, int]:
    (n,) = struct.unpack_from("<H", blob, 0)
    return blob[2 : 2 + n].decode(), 2 + n


def is_embedding(blob: bytes) -> bool:
    """Whether an encoded commitment (or report) is an embedding one."""
    try:
        _, pos = _class_and_rest(blob)
    except (struct.error, UnicodeDecodeError):
        return False
    return blob[pos : pos + len(MAGIC)] == MAGIC


def decode(blob: bytes) -> EmbeddingCommitment:
    """Parse an embedding commitment; a malformed one is InvalidRequest (param commitment)."""
    try:
        det_class, pos = _class_and_rest(blob)
        if blob[pos : pos + len(MAGIC)] != MAGIC:
            raise ValueError("not an embedding commitment")
        pos += len(MAGIC)
        model_len, n, dims, seed, vhash = _HEAD.unpack_from(blob, pos)
        pos += _HEAD.size
        if not 0 < n <= MAX_INPUTS or not 0 < dims <= MAX_DIMS:
            raise ValueError(f"{n} inputs of {dims} dimensions is out of range")
        model = blob[pos : pos + model_len].decode()
        pos += model_len
        counts = struct.unpack_from(f"<{n}I", blob, pos)
        pos += 4 * n
        hashes = tuple(blob[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n))
        pos += 32 * n
        body = blob[pos:]
        if len(body) != 4 * n * dims or any(len(h) != 32 for h in hashes):
            raise ValueError("lengths do not match the header")
        vectors = np.frombuffer(body, dtype="<f4").reshape(n, dims).astype(np.float32)
        if not np.isfinite(vectors).all():
            raise ValueError("a vector holds NaN or infinity")
        if vectors_hash(vectors) != vhash:
            raise ValueError("the vectors do not match their hash")
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"malformed embedding commitment: {exc}", param="commitment") from exc
    header = EmbeddingHeader(det_class, model, int(dims), hashes, tuple(counts), vhash, seed)
    return EmbeddingCommitment(header, vectors)


# ---- the verifier's recomputation and the verdict --------------------------------------


@dataclass(frozen=True)
class EmbeddingReport:
    """What a verifier recomputed: each input's context hash and count, and its vectors."""

    det_class: str
    context_hashes: tuple[bytes, ...]
    token_counts: tuple[int, ...]
    vectors: np.ndarray


def encode_report(r: EmbeddingReport) -> bytes:
    """Binary report, laid out as a commitment (class, magic, header, vectors)."""
    v = np.asarray(r.vectors, dtype=np.float32)
    header = EmbeddingHeader(
        r.det_class, "", int(v.shape[1]), r.context_hashes, r.token_counts, vectors_hash(v)
    )
    return EmbeddingCommitment(header, v).encode()


def decode_report(blob: bytes) -> EmbeddingReport:
    """Parse a verifier's embedding report; malformed input is InvalidRequest (param report)."""
    try:
        c = decode(blob)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message.replace("commitment", "report"), param="report") from exc
    h = c.header
    return EmbeddingReport(h.det_class, h.context_hashes, h.token_counts, c.vectors)


@dataclass(frozen=True)
class EmbeddingTolerance:
    """Largest element-wise difference between unit vectors an honest pair shows (calibrated:
    docs/trust.md), and the least cosine similarity."""

    abs: float
    cos: float


def judge(c: EmbeddingCommitment, r: EmbeddingReport, tol: EmbeddingTolerance) -> Verdict:
    """Compare a verifier's recomputed vectors with the committed ones; pure."""
    h = c.header
    reasons: list[str] = []
    if r.context_hashes != h.context_hashes:
        reasons.append("an input's token ids differ: the vectors are for other inputs")
    if r.token_counts != h.token_counts:
        reasons.append("the committed token counts are not the inputs' (billing reads them)")
    rv = np.asarray(r.vectors, dtype=np.float64)
    cv = np.asarray(c.vectors, dtype=np.float64)
    if rv.shape != cv.shape:
        reasons.append(f"report has shape {rv.shape}, the commitment {cv.shape}")
        return Verdict(False, tuple(reasons), math.inf, -math.inf, 0)
    err = np.abs(rv - cv).max(axis=1)
    norms = np.linalg.norm(rv, axis=1) * np.linalg.norm(cv, axis=1)
    cos = np.where(norms > 0, (rv * cv).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
    bad = [i for i in range(len(err)) if not (err[i] <= tol.abs and cos[i] >= tol.cos)]
    if bad:
        i = bad[0]
        reasons.append(
            f"{len(bad)} of {len(err)} vectors differ from the recomputation (input {i}: "
            f"max |diff| {err[i]:.3g} > {tol.abs:g} or cosine {cos[i]:.6f} < {tol.cos:g})"
        )
    worst = float(err.max()) if len(err) else 0.0
    worst_cos = float(cos.min()) if len(cos) else 1.0
    return Verdict(
        not reasons,
        tuple(reasons),
        worst,
        worst_cos,
        bad[0] if bad else None,
        {"worst_abs": worst, "worst_cos": worst_cos},
    )


def vector_b64(vector: np.ndarray) -> str:
    """OpenAI's base64 embedding: the float32 little-endian bytes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()


def b64_vector(text: str) -> np.ndarray:
    """A vector from `vector_b64`'s text."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")
