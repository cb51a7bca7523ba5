"""Pipeline + data-parallel training in one process, every stage boundary a compressing link.

Each replica owns a fixed shard of the samples (so AQ-SGD's per-sample caches live on one
pipeline, as they would on real hosts) and its own links. A step runs every replica's
forward and backward through its links, exchanges the replicas' gradients through
`GradientExchange`, and applies one optimizer step to the shared weights. Nothing
overlaps: this measures convergence and bytes, not speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from idlegrid.comm.aqsgd import (
    AqSgdReceiver,
    AqSgdSender,
    DirectReceiver,
    DirectSender,
    RawReceiver,
    RawSender,
)
from idlegrid.comm.gradients import GradientExchange
from idlegrid.comm.quantize import dequantize, quantize
from idlegrid.training.data import Windows
from idlegrid.training.gpt import GPTConfig, build_stages

METHODS = ("none", "aqsgd", "direct")


@dataclass(frozen=True)
class RunConfig:
    """One training run."""

    method: str = "none"  # activation compression: none | aqsgd | direct
    fwd_bits: int = 4
    per_token: bool = True  # one fp16 scale per token row, else per channel (AQ-SGD's code)
    bwd_bits: int | None = None  # activation-gradient bits (None: fp32)
    grad_bits: int | None = None  # data-parallel gradient bits with error feedback
    stages: int = 4
    replicas: int = 2
    steps: int = 300
    batch: int = 32  # sequences per step, all replicas together
    lr: float = 3e-3
    seed: int = 0


@dataclass
class RunResult:
    """Loss curve, final losses and bytes on the wire."""

    losses: list[float]
    eval_loss: float  # held-out windows, whole model, no compression
    train_loss: float  # the training windows, same
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def final_train_loss(self, last: int = 25) -> float:
        """Mean training loss over the last `last` steps."""
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


class Link:
    """One stage boundary of one pipeline: forward codec, backward quantizer, byte counts."""

    def __init__(
        self, cfg: RunConfig, num_samples: int, sample_shape: tuple[int, ...], seed: int
    ) -> None:
        bucket = sample_shape[-1] if cfg.per_token else None
        self.bucket = bucket
        if cfg.method == "aqsgd":
            self.sender: AqSgdSender | DirectSender | RawSender = AqSgdSender(
                num_samples, sample_shape, cfg.fwd_bits, bucket=bucket, seed=seed
            )
            self.receiver: AqSgdReceiver | DirectReceiver | RawReceiver = AqSgdReceiver(
                num_samples, sample_shape
            )
        elif cfg.method == "direct":
            self.sender, self.receiver = DirectSender(cfg.fwd_bits, bucket), DirectReceiver()
        else:
            self.sender, self.receiver = RawSender(), RawReceiver()
        self.bwd_bits = cfg.bwd_bits
        self.fwd_bytes = self.bwd_bytes = self.fp32_bytes = 0

    def forward(self, ids: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """What the next stage receives for these samples."""
        msg = self.sender.encode(ids, act)
        self.fwd_bytes += msg.nbytes
        self.fp32_bytes += act.numel() * 4
        return self.receiver.decode(ids, msg)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """What the previous stage receives as the gradient of its output."""
        if self.bwd_bits is None:
            self.bwd_bytes += grad.numel() * 4
            return grad
        q = quantize(grad, self.bwd_bits, bucket=self.bucket)
        self.bwd_bytes += q.nbytes
        return dequantize(q)


def _step_replica(
    stages: list[nn.Sequential], links: list[Link], ids: torch.Tensor, windows: torch.Tensor
) -> float:
    x, y = windows[:, :-1], windows[:, 1:]
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    h: torch.Tensor = x
    for j, stage in enumerate(stages):
        if j > 0:
            h = links[j - 1].forward(ids, outputs[-1]).requires_grad_(True)
            inputs.append(h)
        outputs.append(stage(h))
    loss = F.cross_entropy(outputs[-1].reshape(-1, outputs[-1].shape[-1]), y.reshape(-1))
    loss.backward()  # type: ignore[no-untyped-call]
    for j in range(len(stages) - 1, 0, -1):  # hand each input's gradient upstream
        grad = inputs[j - 1].grad
        assert grad is not None
        outputs[j - 1].backward(links[j - 1].backward(grad))  # type: ignore[no-untyped-call]
    return float(loss.detach())


@torch.no_grad()
def evaluate(stages: list[nn.Sequential], windows: torch.Tensor) -> float:
    """Uncompressed loss of the whole model on `windows`."""
    h: torch.Tensor = windows[:, :-1]
    for stage in stages:
        h = stage(h)
    return float(F.cross_entropy(h.reshape(-1, h.shape[-1]), windows[:, 1:].reshape(-1)))


def train(cfg: RunConfig, data: Windows, model: GPTConfig) -> RunResult:
    """Train from scratch with cfg's compression; deterministic for a seed."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.batch % cfg.replicas:
        raise ValueError("batch must divide evenly over replicas")
    started = time.perf_counter()
    stages = build_stages(model, cfg.stages, cfg.seed)
    params = [(f"{j}.{n}", p) for j, s in enumerate(stages) for n, p in s.named_parameters()]
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=0.0)
    n = data.train.shape[0]
    shape = (model.seq, model.dim)
    links = [
        [Link(cfg, n, shape, seed=cfg.seed * 1000 + 10 * r + j) for j in range(cfg.stages - 1)]
        for r in range(cfg.replicas)
    ]
    exchange = GradientExchange(cfg.replicas, cfg.grad_bits)
    shards = [torch.arange(r, n, cfg.replicas) for r in range(cfg.replicas)]
    gen = torch.Generator().manual_seed(cfg.seed)
    orders = [s[torch.randperm(len(s), generator=gen)] for s in shards]
    cursor, per = 0, cfg.batch // cfg.replicas
    losses = []
    for _ in range(cfg.steps):
        if cursor + per > len(orders[0]):  # next epoch: reshuffle every shard
            orders = [s[torch.randperm(len(s), generator=gen)] for s in shards]
            cursor = 0
        grads, step_loss = [], 0.0
        for r in range(cfg.replicas):
            ids = orders[r][cursor : cursor + per]
            opt.zero_grad(set_to_none=True)
            step_loss += _step_replica(stages, links[r], ids, data.train[ids])
            grads.append(
                {name: p.grad.detach().clone() for name, p in params if p.grad is not None}
            )
        cursor += per
        averaged = exchange.exchange(grads)
        for name, p in params:
            p.grad = averaged.get(name)
        opt.step()
        losses.append(step_loss / cfg.replicas)
    all_links = [lk for row in links for lk in row]
    return RunResult(
        losses=losses,
        eval_loss=evaluate(stages, data.eval),
        train_loss=evaluate(stages, data.train),
        bytes={
            "activations": sum(lk.fwd_bytes for lk in all_links),
            "activations_fp32": sum(lk.fp32_bytes for lk in all_links),
            "activation_grads": sum(lk.bwd_bytes for lk in all_links),
            "gradients_up": exchange.bytes_up,
            "gradients_down": exchange.bytes_down,
        },
        seconds=time.perf_counter() - started,
    )
