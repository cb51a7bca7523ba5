"""Operator-level trace of one training step, for the second level of a dispute.

A `TorchDispatchMode` sees every aten operator the step runs, in order: the forward, the
backward (autograd calls the same dispatcher), the optimizer update and the small glue ops
(batch indexing, the step counter). Each call becomes an `OpRecord`: the operator, a
signature (non-tensor arguments, input shapes and dtypes), the SHA-256 of every input and
of the output. The records form a hash chain (c_i = H(c_{i−1} ‖ record_i), c_{−1} = the
agreed start state hash), so "the parties agree at op i" means they agree on every op up to
i, which makes agreement monotone and bisection sound: the first disagreeing op has inputs
produced by agreed ops (or by the agreed start state and the spec's data).

The referee then recomputes that one operator (`recompute_op`) on inputs whose hashes it
checks against the agreed record, in the disputed determinism class, and compares output
hashes. Imports torch.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

Tamper = tuple[int, Callable[[torch.Tensor], None]]


def tensor_hash(t: torch.Tensor) -> bytes:
    """SHA-256 of a tensor's dtype, shape and contiguous bytes."""
    x = t.detach().contiguous().reshape(-1)
    h = hashlib.sha256(f"{x.dtype}|{tuple(t.shape)}|".encode())
    if x.numel():
        h.update(x.view(torch.uint8).numpy())
    return h.digest()


_PLAIN = (
    int,
    float,
    bool,
    str,
    type(None),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)


def _plain(v: Any) -> str:
    """A stable text form of a non-tensor argument (objects by type: their repr has addresses)."""
    if isinstance(v, float) and math.isfinite(v):
        return v.hex()
    return repr(v) if isinstance(v, _PLAIN) else type(v).__name__


def _value_hash(v: Any) -> bytes:
    leaves, _ = tree_flatten(v)
    h = hashlib.sha256()
    for leaf in leaves:
        h.update(tensor_hash(leaf) if isinstance(leaf, torch.Tensor) else _plain(leaf).encode())
    return h.digest()


@dataclass(frozen=True)
class OpRecord:
    """One operator call of a traced step."""

    index: int
    name: str
    signature: str
    input_hashes: tuple[bytes, ...]
    output_hash: bytes
    output_summary: tuple[float, ...]  # (numel, sum, max |x|) of the first tensor output

    def record_bytes(self) -> bytes:
        """Canonical bytes that the op chain covers."""
        head = f"{self.index}|{self.name}|{self.signature}|".encode()
        return (
            head
            + struct.pack("<I", len(self.input_hashes))
            + b"".join(self.input_hashes)
            + self.output_hash
        )


@dataclass(frozen=True)
class _Slot:
    i: int


@dataclass
class OpCall:
    """What the referee needs to rerun one op: the operator and its arguments, with the
    tensors left as numbered slots to be filled with checked inputs."""

    func: Any
    spec: Any
    flat: list[Any]


@dataclass
class Trace:
    """The records of one step, plus (for the kept op) its call and cloned inputs."""

    records: list[OpRecord] = field(default_factory=list)
    calls: dict[int, OpCall] = field(default_factory=dict)
    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def chain(self, start: bytes) -> list[bytes]:
        """Hash chain over the records, seeded with the agreed start state hash."""
        return op_chain(start, self.records)


def op_chain(start: bytes, records: Sequence[OpRecord]) -> list[bytes]:
    """c_i = SHA-256(c_{i−1} ‖ record_i), c_{−1} = start."""
    out, c = [], start
    for r in records:
        c = hashlib.sha256(c + r.record_bytes()).digest()
        out.append(c)
    return out


def _signature(func: Any, flat: list[Any]) -> str:
    return ",".join(
        f"T{tuple(a.shape)}:{a.dtype}" if isinstance(a, torch.Tensor) else _plain(a) for a in flat
    )


def _summary(out: Any) -> tuple[float, ...]:
    leaves, _ = tree_flatten(out)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.numel():
            x = leaf.detach().double()
            return (float(leaf.numel()), float(x.sum()), float(x.abs().max()))
    return ()


class Recorder(TorchDispatchMode):
    """Records every aten call; optionally keeps one op's inputs or tampers one op's output."""

    def __init__(self, keep: int | None = None, tamper: Tamper | None = None) -> None:
        super().__init__()
        self.trace = Trace()
        self.keep = keep
        self.tamper = tamper

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        i = len(self.trace.records)
        flat, spec = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        in_hashes = tuple(tensor_hash(t) for t in tensors)
        if i == self.keep:
            slots, k = [], 0
            for a in flat:
                if isinstance(a, torch.Tensor):
                    slots.append(_Slot(k))
                    k += 1
                else:
                    slots.append(a)
            self.trace.calls[i] = OpCall(func, spec, slots)
            self.trace.inputs[i] = [t.detach().clone() for t in tensors]
        out = func(*args, **kwargs)
        if self.tamper is not None and self.tamper[0] == i:
            first = next((x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)), None)
            if first is not None:
                self.tamper[1](first)
        self.trace.records.append(
            OpRecord(
                i, str(func), _signature(func, flat), in_hashes, _value_hash(out), _summary(out)
            )
        )
        return out


def recompute_op(
    call: OpCall, inputs: Sequence[torch.Tensor], expected_inputs: Sequence[bytes], threads: int = 1
) -> bytes:
    """The referee's one-operator recompute: check the inputs against the agreed hashes,
    run the op, return its output hash. ValueError if an input is not the agreed one."""
    if len(inputs) != len(expected_inputs):
        raise ValueError("wrong number of inputs")
    for k, (t, h) in enumerate(zip(inputs, expected_inputs, strict=True)):
        if tensor_hash(t) != h:
            raise ValueError(f"input {k} does not hash to the agreed value")
    clones = [t.detach().clone() for t in inputs]
    flat = [clones[a.i] if isinstance(a, _Slot) else a for a in call.flat]
    args, kwargs = tree_unflatten(flat, call.spec)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out = call.func(*args, **kwargs)
    finally:
        torch.set_num_threads(prev)
    return _value_hash(out)
