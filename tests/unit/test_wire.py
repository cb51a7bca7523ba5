"""Training peers exchange data, never code: the wire codec and authenticated frames."""

from __future__ import annotations

import pickle
import socket
import struct

import numpy as np
import pytest

from idlegrid.comm import wire
from idlegrid.comm.transport import Endpoint


def test_roundtrip_keeps_arrays_and_structure() -> None:
    rng = np.random.default_rng(0)
    obj = {
        "fresh": rng.random(5) > 0.5,
        "delta": {
            "p": rng.integers(0, 255, (3, 4), np.uint8),
            "s": rng.random(3, np.float32),
            "shape": [3, 4],
            "bits": 4,
            "bucket": 48,
        },
        "full": None,
        "raw": rng.random((2, 3, 4), np.float32),
    }
    out = wire.decode(wire.encode(obj))
    assert out["delta"]["shape"] == [3, 4] and out["full"] is None
    for a, b in (
        (obj["fresh"], out["fresh"]),
        (obj["raw"], out["raw"]),
        (obj["delta"]["p"], out["delta"]["p"]),
    ):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    out["raw"][0, 0, 0] = 7.0  # writable, detached from the buffer


def test_a_pickle_is_refused_not_run() -> None:
    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, ("raise SystemExit('ran peer code')",))

    with pytest.raises(wire.WireError):
        wire.decode(pickle.dumps(Boom()))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-1],  # a short array
        lambda b: b + b"x",  # trailing bytes
        lambda b: b.replace(b'"float32"', b'"object0"'),  # a dtype not sent
        lambda b: b[:4] + struct.pack("!I", 10**9) + b[8:],  # header length past the end
    ],
)
def test_malformed_messages_are_refused(mutate) -> None:
    good = wire.encode({"raw": np.ones((2, 2), np.float32)})
    with pytest.raises(wire.WireError):
        wire.decode(mutate(good))


def test_objects_are_not_encoded() -> None:
    with pytest.raises(wire.WireError):
        wire.encode({"x": object()})
    with pytest.raises(wire.WireError):
        wire.encode({"$a": 0})


def test_frames_without_the_job_secret_are_dropped() -> None:
    latency = [[0.0, 0.0], [0.0, 0.0]]
    a = Endpoint(0, [("127.0.0.1", 0), ("127.0.0.1", 0)], latency, secret=b"s" * 32)
    b = Endpoint(1, [a.addresses[0], ("127.0.0.1", 0)], latency, secret=b"s" * 32)
    a.addresses[1] = b.addresses[1]
    try:
        b.send(0, 7, b"honest")
        assert a.recv(1, 7, timeout=10) == b"honest"
        # A stranger claims rank 1 without the secret: its frame never arrives.
        with socket.create_connection(a.addresses[0]) as s:
            s.sendall(struct.pack("!iiQ", 1, 7, 6) + b"forged" + b"\0" * 32)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)  # the endpoint closes the connection on the bad MAC
        b.send(0, 7, b"after")
        assert a.recv(1, 7, timeout=10) == b"after"
        assert a.rejected == 1
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    "addr,peer,ok",
    [
        ("127.0.0.1:29500", "127.0.0.1", True),
        ("[::1]:29500", "::1", True),
        ("10.0.0.7:29500", "127.0.0.1", False),  # another host's address
        ("evil.example:29500", "127.0.0.1", False),  # a name: rebinding
        ("127.0.0.1:22", "127.0.0.1", False),  # a privileged port
        ("127.0.0.1", "127.0.0.1", False),
    ],
)
def test_a_gang_rendezvous_must_be_the_nodes_own_address(addr: str, peer: str, ok: bool) -> None:
    from idlegrid.coordinator.training.routes import check_gang_addr
    from idlegrid.errors import InvalidRequest

    if ok:
        check_gang_addr(addr, peer)
    else:
        with pytest.raises(InvalidRequest) as err:
            check_gang_addr(addr, peer)
        assert err.value.param == "gang_addr"
