"""One host of a real pipeline + data-parallel training job over `comm.transport`.

`python -m idlegrid.training.distributed CONFIG.json RANK` runs the stage that the plan
gives this rank: GPipe (all forwards, then all backwards) over `micro_batches`
micro-batches, activations and their gradients to pipeline neighbours, then a sharded
parameter-server gradient exchange inside the stage's data-parallel group, then AdamW.
Optional AQ-SGD on activations and error-feedback quantization on gradients.

Start-up handshake on stdio (so no peer ever races another's listen()): the process
binds, prints `READY`, waits for `GO` on stdin, connects, trains, prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from torch.nn import functional as F

from idlegrid.comm import wire
from idlegrid.comm.aqsgd import ActivationMessage, AqSgdReceiver, AqSgdSender
from idlegrid.comm.gradients import ErrorFeedback
from idlegrid.comm.quantize import Quantized, dequantize, quantize
from idlegrid.comm.transport import Endpoint
from idlegrid.training.data import load_corpus, make_windows
from idlegrid.training.gpt import GPTConfig, build_stages

FWD, BWD, SCATTER, GATHER = 1, 2, 3, 4


def _tag(kind: int, step: int, micro: int) -> int:
    return kind * 10_000_000 + step * 1_000 + micro


def _pack_q(q: Quantized | None) -> dict[str, Any] | None:
    if q is None:
        return None
    return {
        "p": q.packed.numpy(),
        "s": q.scale.numpy(),
        "shape": q.shape,
        "bits": q.bits,
        "bucket": q.bucket,
    }


def _unpack_q(d: dict[str, Any] | None) -> Quantized | None:
    if d is None:
        return None
    return Quantized(
        torch.from_numpy(d["p"]),
        torch.from_numpy(d["s"]),
        tuple(d["shape"]),
        d["bits"],
        d["bucket"],
    )


def _dumps(obj: Any) -> bytes:
    return wire.encode(obj)


def _loads(data: bytes) -> Any:
    # Data only: a peer's bytes are never unpickled (comm/wire.py).
    return wire.decode(data)


class Worker:
    """The stage this rank runs, its links and its data-parallel group."""

    def __init__(self, cfg: dict[str, Any], rank: int) -> None:
        self.cfg, self.rank = cfg, rank
        plan: list[list[int]] = cfg["plan"]
        self.stage, self.pipe = next(
            (j, i) for j, row in enumerate(plan) for i, host in enumerate(row) if host == rank
        )
        self.depth, self.width = len(plan), len(plan[0])
        self.prev = plan[self.stage - 1][self.pipe] if self.stage > 0 else None
        self.next = plan[self.stage + 1][self.pipe] if self.stage < self.depth - 1 else None
        self.group = plan[self.stage]
        m = cfg["model"]
        self.model_cfg = GPTConfig(seq=m["seq"], layers=m["layers"], dim=m["dim"], heads=m["heads"])
        torch.manual_seed(cfg["seed"])
        self.module = build_stages(self.model_cfg, self.depth, cfg["seed"])[self.stage]
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=cfg["lr"], weight_decay=0.0)
        windows = make_windows(load_corpus(), m["seq"], cfg["samples"], 8).train
        self.shard = windows[self.pipe :: self.width]
        comp = cfg["compression"]
        n, shape = len(self.shard), (m["seq"], m["dim"])
        aq = comp["method"] == "aqsgd"
        self.sender = AqSgdSender(n, shape, comp["fwd_bits"], bucket=m["dim"]) if aq else None
        self.receiver = AqSgdReceiver(n, shape) if aq else None
        self.bwd_bits: int | None = comp.get("bwd_bits")
        self.grad_bits: int | None = comp.get("grad_bits")
        self.ef = ErrorFeedback(self.grad_bits) if self.grad_bits else None
        self.server_ef = ErrorFeedback(self.grad_bits) if self.grad_bits else None
        lat = cfg["latency_s"]
        # Frames are authenticated with the job's secret: a stranger who reaches the port
        # cannot inject activations or gradients.
        secret = bytes.fromhex(cfg["secret"]) if cfg.get("secret") else None
        self.ep = Endpoint(rank, [tuple(a) for a in cfg["addresses"]], lat, secret=secret)

    def _micro_ids(self, step: int) -> list[torch.Tensor]:
        c = self.cfg
        g = torch.Generator().manual_seed(c["seed"] * 7919 + step)
        order = torch.randperm(len(self.shard), generator=g)
        b = c["micro_batch"]
        return [order[k * b : (k + 1) * b] for k in range(c["micro_batches"])]

    def _send_act(self, step: int, micro: int, ids: torch.Tensor, out: torch.Tensor) -> None:
        assert self.next is not None
        if self.sender is not None:
            msg = self.sender.encode(ids, out)
            body = {
                "fresh": msg.fresh.numpy(),
                "delta": _pack_q(msg.delta),
                "full": None if msg.full is None else msg.full.numpy(),
            }
        else:
            body = {"raw": out.detach().numpy()}
        self.ep.send(self.next, _tag(FWD, step, micro), _dumps(body))

    def _recv_act(self, step: int, micro: int, ids: torch.Tensor) -> torch.Tensor:
        assert self.prev is not None
        body = _loads(self.ep.recv(self.prev, _tag(FWD, step, micro)))
        if "raw" in body:
            return torch.from_numpy(body["raw"])
        assert self.receiver is not None
        full = None if body["full"] is None else torch.from_numpy(body["full"])
        msg = ActivationMessage(torch.from_numpy(body["fresh"]), full, _unpack_q(body["delta"]))
        return self.receiver.decode(ids, msg)

    def _send_grad(self, step: int, micro: int, grad: torch.Tensor) -> None:
        assert self.prev is not None
        if self.bwd_bits:
            body: dict[str, Any] = {
                "q": _pack_q(quantize(grad, self.bwd_bits, bucket=grad.shape[-1]))
            }
        else:
            body = {"raw": grad.numpy()}
        self.ep.send(self.prev, _tag(BWD, step, micro), _dumps(body))

    def _recv_grad(self, step: int, micro: int) -> torch.Tensor:
        assert self.next is not None
        body = _loads(self.ep.recv(self.next, _tag(BWD, step, micro)))
        if "raw" in body:
            return torch.from_numpy(body["raw"])
        q = _unpack_q(body["q"])
        assert q is not None
        return dequantize(q)

    def _encode_vec(self, ef: ErrorFeedback | None, name: str, v: torch.Tensor) -> bytes:
        if ef is None:
            return _dumps({"raw": v.numpy()})
        return _dumps({"q": _pack_q(ef.compress(name, v))})

    @staticmethod
    def _decode_vec(payload: bytes) -> torch.Tensor:
        body = _loads(payload)
        if "raw" in body:
            return torch.from_numpy(body["raw"])
        q = _unpack_q(body["q"])
        assert q is not None
        return dequantize(q)

    def _exchange(self, step: int) -> None:
        """Sharded parameter server: reduce-scatter then all-gather, one shard per member."""
        params = [p for p in self.module.parameters()]
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        if self.width > 1:
            shards = list(torch.tensor_split(flat, self.width))
            for pos, host in enumerate(self.group):
                if host != self.rank:
                    self.ep.send(
                        host,
                        _tag(SCATTER, step, pos),
                        self._encode_vec(self.ef, f"to{pos}", shards[pos]),
                    )
            mine = [shards[self.pipe]]  # my own shard never crosses a link
            for host in self.group:
                if host != self.rank:
                    mine.append(
                        self._decode_vec(self.ep.recv(host, _tag(SCATTER, step, self.pipe)))
                    )
            avg = torch.stack(mine).mean(dim=0)
            payload = self._encode_vec(self.server_ef, "avg", avg)
            for host in self.group:
                if host != self.rank:
                    self.ep.send(host, _tag(GATHER, step, self.pipe), payload)
            shards[self.pipe] = self._decode_vec(payload)
            for pos, host in enumerate(self.group):
                if host != self.rank:
                    shards[pos] = self._decode_vec(self.ep.recv(host, _tag(GATHER, step, pos)))
            flat = torch.cat(shards)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def step(self, step: int) -> float | None:
        """One iteration; returns the mean loss on the last stage."""
        ids_list = self._micro_ids(step)
        saved: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        losses = []
        self.opt.zero_grad(set_to_none=True)
        for micro, ids in enumerate(ids_list):
            windows = self.shard[ids]
            if self.prev is None:
                h_in: torch.Tensor | None = None
                out = self.module(windows[:, :-1])
            else:
                h_in = self._recv_act(step, micro, ids).requires_grad_(True)
                out = self.module(h_in)
            if self.next is not None:
                self._send_act(step, micro, ids, out)
                saved.append((h_in, out))
            else:
                loss = F.cross_entropy(
                    out.reshape(-1, out.shape[-1]), windows[:, 1:].reshape(-1)
                ) / len(ids_list)
                losses.append(float(loss.detach()) * len(ids_list))
                saved.append((h_in, loss))
        for micro in reversed(range(len(ids_list))):
            h_in, out = saved[micro]
            if self.next is None:
                out.backward()  # type: ignore[no-untyped-call]
            else:
                out.backward(self._recv_grad(step, micro))  # type: ignore[no-untyped-call]
            if h_in is not None:
                assert h_in.grad is not None
                self._send_grad(step, micro, h_in.grad)
        self._exchange(step)
        self.opt.step()
        return sum(losses) / len(losses) if losses else None

    def run(self) -> dict[str, Any]:
        """Connect, train, report."""
        peers = [h for h in (self.prev, self.next) if h is not None] + list(self.group)
        self.ep.connect(peers)
        times, losses = [], []
        for step in range(self.cfg["steps"]):
            loss = self.step(step)
            times.append(time.monotonic())
            if loss is not None:
                losses.append(loss)
        self.ep.close()
        return {
            "rank": self.rank,
            "stage": self.stage,
            "pipeline": self.pipe,
            "times": times,
            "losses": losses,
            "bytes_sent": self.ep.bytes_sent,
        }


def main(argv: list[str]) -> None:
    """Entry point for one host."""
    torch.set_num_threads(1)
    with open(argv[0]) as f:
        cfg = json.load(f)
    worker = Worker(cfg, int(argv[1]))
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    result = worker.run()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
