"""Answering hardware challenges: the seeded matmul (on the GPU when torch sees one) and the
memory fill and chase. The coordinator times every phase; nothing here reports a time."""

from __future__ import annotations

import asyncio
import base64
import logging
from functools import partial
from typing import Any

import numpy as np

from idlegrid.agent.context import AgentContext, Answers, Role
from idlegrid.core.trust import hwproof as hw
from idlegrid.core.trust import memproof as mp
from idlegrid.core.trust import merkle

log = logging.getLogger("idlegrid.agent.hwprover")


def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _values_torch(torch: Any, k: int, n: int, bits: int) -> Any:
    """The core's PRF in int64 with masks: the same values as numpy's uint32, on the GPU."""
    m = 0xFFFFFFFF
    x = torch.arange(n * n, dtype=torch.int64, device="cuda")
    x = (x * hw.GOLDEN + k) & m
    x ^= x >> 16
    x = (x * hw.M1) & m
    x ^= x >> 15
    x = (x * hw.M2) & m
    x ^= x >> 16
    return ((x >> (32 - bits)).to(torch.float32) * (2.0 / (1 << bits)) - 1.0).reshape(n, n)


class HonestProver:
    """Does the whole challenge at full precision."""

    _torch: Any = None
    _warm = False

    def warm(self) -> None:
        """Import torch and probe the GPU before any challenge: the clock runs during one."""
        if not self._warm:
            self._torch = _torch_cuda()
            self._warm = True

    def product(self, seed: bytes, n: int, dtype: str) -> np.ndarray:
        """C = A·B as float32."""
        bits = hw.VALUE_BITS[dtype]
        self.warm()
        torch = self._torch
        if torch is not None:
            a = _values_torch(torch, hw.key(seed, "A"), n, bits)
            b = _values_torch(torch, hw.key(seed, "B"), n, bits)
            torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would miss the tolerance
            if dtype == "fp16":
                try:  # fp16 tensor cores, fp32 out: the inputs are exact in fp16
                    c = torch.mm(a.half(), b.half(), out_dtype=torch.float32)
                except (TypeError, RuntimeError):
                    c = a @ b
            else:
                c = a @ b
            return c.cpu().numpy()  # type: ignore[no-any-return]
        return hw.matrix(seed, "A", n, bits) @ hw.matrix(seed, "B", n, bits)

    def fill(self, seed: bytes, spec: mp.MemSpec) -> np.ndarray:
        """The memory buffer."""
        return mp.fill(seed, spec)

    def chase(self, buf: np.ndarray, chase_seed: bytes, spec: mp.MemSpec) -> np.ndarray:
        """The chase trace."""
        return mp.chase(buf, chase_seed, spec)


class HwProofs(Role):
    """Answers the hardware challenges that heartbeats hand this node, beside serving (the
    coordinator times them); `prover` does the work (testbed cheats plug in here)."""

    def __init__(self, ctx: AgentContext, prover: HonestProver | None = None) -> None:
        self.ctx = ctx
        self.prover = prover or HonestProver()
        self.verdicts = Answers("hardware proof")

    async def warm(self) -> None:
        """Warm the prover up before registering: the clock runs during a challenge."""
        await asyncio.get_running_loop().run_in_executor(None, self.prover.warm)

    def on_heartbeat(self, beat: dict[str, Any]) -> None:
        """Answer each hardware challenge the heartbeat hands this node, once."""
        for pid in beat.get("hwproofs", []):
            self.verdicts.start(pid, partial(self.prove, pid))

    async def prove(self, pid: str) -> dict[str, Any] | None:
        """Run one challenge end to end: start, compute, commit, open; the verdict."""
        loop = asyncio.get_running_loop()
        call = self.ctx.client.call
        prover = self.prover
        ch = await call(f"/api/v1/hwproofs/{pid}/start", {})
        assert ch is not None
        seed, spec = bytes.fromhex(ch["seed"]), ch["spec"]
        if ch["kind"] == "matmul":

            def work() -> tuple[bytes, list[bytes], np.ndarray]:
                c = prover.product(seed, spec["n"], spec["dtype"])
                root, leaves = hw.commit_rows(c)
                return root, leaves, c

            root, leaves, c = await loop.run_in_executor(None, work)
            opened = await call(f"/api/v1/hwproofs/{pid}/commit", {"root": root.hex()})
            assert opened is not None
            openings = []
            for i in opened["rows"]:
                p = merkle.merkle_proof(leaves, i)
                openings.append(
                    {
                        "index": i,
                        "row": base64.b64encode(leaves[i]).decode(),
                        "siblings": [h.hex() for h in p.siblings],
                        "right": list(p.right),
                    }
                )
            return await call(f"/api/v1/hwproofs/{pid}/open", {"openings": openings})
        ms = mp.MemSpec(
            spec["words"], spec["rounds"], spec["chases"], spec["steps"], spec["samples"]
        )
        buf = await loop.run_in_executor(None, prover.fill, seed, ms)
        got = await call(f"/api/v1/hwproofs/{pid}/commit", {"root": ""})
        assert got is not None
        trace = await loop.run_in_executor(
            None, prover.chase, buf, bytes.fromhex(got["chase_seed"]), ms
        )
        del buf
        words = np.ascontiguousarray(trace, dtype="<u4").tobytes()
        return await call(
            f"/api/v1/hwproofs/{pid}/open", {"trace": base64.b64encode(words).decode()}
        )
