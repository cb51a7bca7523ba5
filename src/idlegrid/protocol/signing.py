"""Ed25519 request signing for the node API.

A node signs `method \\n path \\n sha256(body) \\n timestamp \\n nonce` with its key. The
coordinator refuses a signature that does not verify, a timestamp outside the allowed
skew, and a nonce it has seen within the window (a replay). Node ids are derived from the
public key, so a node cannot claim another's id.

Frames on the agent channel (a WebSocket, coordinator/inference/channel.py) are signed the same way,
with method "WS" and the channel's path: `timestamp nonce signature \\n body`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from idlegrid.errors import AuthError

HEADER_NODE = "x-idlegrid-node"
HEADER_TIMESTAMP = "x-idlegrid-timestamp"
HEADER_NONCE = "x-idlegrid-nonce"
HEADER_SIGNATURE = "x-idlegrid-signature"
HEADER_PUBKEY = "x-idlegrid-public-key"  # only on registration, before the key is known

DEFAULT_MAX_SKEW_S = 30.0
FRAME_METHOD = "WS"


def node_id_for(public_key: bytes) -> str:
    """A node's id: the first 16 bytes of sha256(public key), hex."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def message(method: str, path: str, body: bytes, timestamp: str, nonce: str) -> bytes:
    """The exact bytes a node signs."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{path}\n{digest}\n{timestamp}\n{nonce}".encode()


@dataclass
class NodeKey:
    """A node's Ed25519 key pair."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """Load the key at `path`, creating it (mode 0600) on first use."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise AuthError(f"{path} is not an Ed25519 key")
            return cls(key)
        node_key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = node_key.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return node_key

    @property
    def public_bytes(self) -> bytes:
        """Raw 32-byte public key."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        """This key's node id."""
        return node_id_for(self.public_bytes)

    def sign_headers(
        self, method: str, path: str, body: bytes, *, now: float, nonce: str | None = None
    ) -> dict[str, str]:
        """Headers that authenticate one request."""
        timestamp = f"{now:.3f}"
        nonce = nonce or secrets.token_hex(16)
        sig = self.private.sign(message(method, path, body, timestamp, nonce))
        return {
            HEADER_NODE: self.node_id,
            HEADER_TIMESTAMP: timestamp,
            HEADER_NONCE: nonce,
            HEADER_SIGNATURE: base64.b64encode(sig).decode(),
            HEADER_PUBKEY: base64.b64encode(self.public_bytes).decode(),
        }

    def sign_frame(self, path: str, body: bytes, *, now: float) -> bytes:
        """One signed channel frame: `timestamp nonce signature\\n` then the body."""
        timestamp, nonce = f"{now:.3f}", secrets.token_hex(16)
        sig = self.private.sign(message(FRAME_METHOD, path, body, timestamp, nonce))
        return f"{timestamp} {nonce} {base64.b64encode(sig).decode()}\n".encode() + body


def frame_headers(node_id: str, frame: bytes) -> tuple[dict[str, str], bytes]:
    """Split a channel frame into the headers `Verifier.verify` reads and the signed body."""
    head, sep, body = frame.partition(b"\n")
    parts = head.decode("ascii", "replace").split(" ")
    if not sep or len(parts) != 3:
        raise AuthError("malformed frame signature")
    return {
        HEADER_NODE: node_id,
        HEADER_TIMESTAMP: parts[0],
        HEADER_NONCE: parts[1],
        HEADER_SIGNATURE: parts[2],
    }, body


@functools.lru_cache(maxsize=4096)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    # Parsed once per node, not once per request: every upload is verified.
    return Ed25519PublicKey.from_public_bytes(raw)


class NonceCache:
    """Nonces seen per node within the skew window; a second sighting is a replay."""

    def __init__(self, window_s: float, max_entries: int = 1_000_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def check_and_add(self, node_id: str, nonce: str, now: float) -> None:
        """Record the nonce, or raise AuthError if it was already used."""
        while self._seen:
            (_, first_seen) = next(iter(self._seen.items()))
            if first_seen >= now - self.window_s and len(self._seen) < self.max_entries:
                break
            self._seen.popitem(last=False)
        key = (node_id, nonce)
        if key in self._seen:
            raise AuthError("replayed nonce")
        self._seen[key] = now


class Verifier:
    """Checks signed node requests; clock injected for tests."""

    def __init__(self, clock: Callable[[], float], max_skew_s: float = DEFAULT_MAX_SKEW_S) -> None:
        self.clock = clock
        self.max_skew_s = max_skew_s
        # A nonce only needs remembering while its timestamp could still pass the skew check.
        self.nonces = NonceCache(window_s=2 * max_skew_s)

    def verify(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        public_key: bytes,
    ) -> str:
        """Return the node id if the request is authentic and fresh, else raise AuthError."""
        try:
            node_id = headers[HEADER_NODE]
            timestamp = headers[HEADER_TIMESTAMP]
            nonce = headers[HEADER_NONCE]
            signature = base64.b64decode(headers[HEADER_SIGNATURE], validate=True)
        except (KeyError, ValueError) as exc:
            raise AuthError("missing or malformed signature headers") from exc
        if node_id != node_id_for(public_key):
            raise AuthError("node id does not match its key")
        if not 8 <= len(nonce) <= 64:
            raise AuthError("nonce must be 8 to 64 characters")
        try:
            ts = float(timestamp)
        except ValueError as exc:
            raise AuthError("malformed timestamp") from exc
        # "nan" parses, and every comparison with NaN is false: it would pass the skew check
        # and outlive the nonce window, so the request could be replayed later.
        if not math.isfinite(ts):
            raise AuthError("malformed timestamp")
        now = self.clock()
        if not abs(now - ts) <= self.max_skew_s:
            raise AuthError(f"stale timestamp ({now - ts:+.1f} s from coordinator clock)")
        try:
            _public_key(public_key).verify(signature, message(method, path, body, timestamp, nonce))
        except (InvalidSignature, ValueError) as exc:
            raise AuthError("bad signature") from exc
        # Only a verified request may consume a nonce, or anyone could burn a node's nonces.
        self.nonces.check_and_add(node_id, nonce, now)
        return node_id


def decode_public_key(value: str) -> bytes:
    """Raw public key bytes from the registration header, or AuthError."""
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise AuthError("malformed public key") from exc
    if len(raw) != 32:
        raise AuthError("public key must be 32 bytes")
    return raw
