"""Request signing: bad, stale and replayed requests are refused. Pure (clock injected)."""

from __future__ import annotations

import pytest

from idlegrid.errors import AuthError
from idlegrid.protocol.signing import NodeKey, Verifier, frame_headers


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup() -> tuple[NodeKey, Verifier, Clock]:
    clock = Clock()
    return NodeKey.generate(), Verifier(clock, max_skew_s=30), clock


def test_valid_request_verifies_once(setup: tuple[NodeKey, Verifier, Clock]) -> None:
    key, verifier, clock = setup
    h = key.sign_headers("POST", "/api/v1/x", b"{}", now=clock())
    assert verifier.verify("POST", "/api/v1/x", b"{}", h, key.public_bytes) == key.node_id
    with pytest.raises(AuthError, match="replay"):
        verifier.verify("POST", "/api/v1/x", b"{}", h, key.public_bytes)


@pytest.mark.parametrize("change", ["method", "path", "body", "key"])
def test_any_change_breaks_the_signature(
    setup: tuple[NodeKey, Verifier, Clock], change: str
) -> None:
    key, verifier, clock = setup
    h = key.sign_headers("POST", "/a", b"{}", now=clock())
    args = {"method": "POST", "path": "/a", "body": b"{}", "key": key.public_bytes}
    args[change] = {
        "method": "PUT",
        "path": "/b",
        "body": b"{ }",
        "key": NodeKey.generate().public_bytes,
    }[change]
    with pytest.raises(AuthError):
        verifier.verify(args["method"], args["path"], args["body"], h, args["key"])  # type: ignore[arg-type]


def test_stale_and_future_timestamps_are_refused(setup: tuple[NodeKey, Verifier, Clock]) -> None:
    key, verifier, clock = setup
    for skew in (-31, 31):
        h = key.sign_headers("POST", "/a", b"", now=clock() + skew)
        with pytest.raises(AuthError, match="stale"):
            verifier.verify("POST", "/a", b"", h, key.public_bytes)


def test_nonces_are_forgotten_only_after_they_could_no_longer_pass(
    setup: tuple[NodeKey, Verifier, Clock],
) -> None:
    key, verifier, clock = setup
    h = key.sign_headers("POST", "/a", b"", now=clock(), nonce="abcdefgh12345678")
    verifier.verify("POST", "/a", b"", h, key.public_bytes)
    clock.now += 45  # still remembered; and the timestamp is now stale anyway
    with pytest.raises(AuthError):
        verifier.verify("POST", "/a", b"", h, key.public_bytes)


def test_missing_headers(setup: tuple[NodeKey, Verifier, Clock]) -> None:
    key, verifier, _ = setup
    with pytest.raises(AuthError, match="missing"):
        verifier.verify("POST", "/a", b"", {}, key.public_bytes)


def test_channel_frames_are_signed_like_requests(setup: tuple[NodeKey, Verifier, Clock]) -> None:
    key, verifier, clock = setup
    frame = key.sign_frame("/ch", b'{"op":"poll"}', now=clock())
    headers, body = frame_headers(key.node_id, frame)
    assert body == b'{"op":"poll"}'
    assert verifier.verify("WS", "/ch", body, headers, key.public_bytes) == key.node_id
    with pytest.raises(AuthError, match="replay"):
        verifier.verify("WS", "/ch", body, headers, key.public_bytes)
    # Another channel path, another method, an altered body: each breaks the signature.
    fresh = key.sign_frame("/ch", b'{"op":"poll"}', now=clock())
    headers, body = frame_headers(key.node_id, fresh)
    for method, path, data in [
        ("WS", "/other", body),
        ("POST", "/ch", body),
        ("WS", "/ch", b'{"op":"cancel"}'),
    ]:
        with pytest.raises(AuthError, match="bad signature"):
            verifier.verify(method, path, data, headers, key.public_bytes)
    clock.now += 31
    with pytest.raises(AuthError, match="stale"):
        verifier.verify("WS", "/ch", body, headers, key.public_bytes)


@pytest.mark.parametrize("frame", [b"", b"no newline", b"two parts\n{}", b"a b c d\n{}"])
def test_malformed_frame_headers(frame: bytes) -> None:
    with pytest.raises(AuthError, match="malformed"):
        frame_headers("n", frame)


@pytest.mark.parametrize("ts", ["nan", "NaN", "inf", "-inf"])
def test_a_non_finite_timestamp_is_refused(setup: tuple[NodeKey, Verifier, Clock], ts: str) -> None:
    import base64

    from idlegrid.protocol.signing import HEADER_SIGNATURE, HEADER_TIMESTAMP, message

    key, verifier, clock = setup
    h = key.sign_headers("POST", "/a", b"{}", now=clock())
    # Signed properly over the odd timestamp: only the freshness check can refuse it.
    h[HEADER_TIMESTAMP] = ts
    sig = key.private.sign(message("POST", "/a", b"{}", ts, h["x-idlegrid-nonce"]))
    h[HEADER_SIGNATURE] = base64.b64encode(sig).decode()
    with pytest.raises(AuthError, match="timestamp"):
        verifier.verify("POST", "/a", b"{}", h, key.public_bytes)
