"""The cheat matrix and honest audits as plain loops over real engines (no grid): the
benchmark (bench/bench_trust.py) runs them with the issue's counts, CI with small ones.

Every audit is the real code path: generate with the recorder, build and re-parse the
commitment, recompute in one prefill on the verifier engine, judge.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from idlegrid.core.trust import commitment as cm
from idlegrid.engines.base import Generation, SamplingParams, stream_pieces
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.tiny import TinyEngine
from idlegrid.testbed import cheats

TOL = cm.Tolerance(rel=1e-4, rank_slack=1e-4, margin=1e-3)


def one_audit(
    provider: Any,
    verifier: Any,
    i: int,
    temperature: float,
    max_tokens: int = 32,
    provider_threads: int = 1,
    verifier_threads: int = 1,
) -> tuple[cm.Verdict, float, float]:
    """Serve request i on `provider`, audit it on `verifier`; (verdict, gen s, verify s)."""
    ids = provider.tokenize(f"Request number {i}: write something about item {i * 7 % 101}")
    rec = Recorder()
    provider.recorder = rec
    res = Generation()
    torch.set_num_threads(provider_threads)
    t0 = time.perf_counter()
    for _ in stream_pieces(
        provider, ids, SamplingParams(temperature, 1.0, 1000 + i), max_tokens=max_tokens, result=res
    ):
        pass
    t1 = time.perf_counter()
    provider.recorder = None
    c = build_commitment(provider, "tiny", ids, rec, 1000 + i, temperature, 1.0, res.finish_reason)
    c = cm.decode(c.encode())
    torch.set_num_threads(verifier_threads)
    t2 = time.perf_counter()
    report = verifier.audit(ids, c, max_tokens)
    t3 = time.perf_counter()
    return cm.judge(c, report, TOL, max_tokens), t1 - t0, t3 - t2


def cheat_matrix(n: int) -> dict[str, float]:
    """Detection rate per cheat over n audits each."""
    verifier = TinyEngine("tiny")
    out = {}
    for name, cls in cheats.CHEATS.items():
        eng = cls("tiny")
        if name == "e":  # its cached answer is to a prompt no audited request uses
            one_audit(eng, verifier, -1, 0.0)
        temp = 0.0 if name in ("a", "b", "e") else 1.0
        caught = sum(not one_audit(eng, verifier, i, temp)[0].passed for i in range(n))
        out[name] = caught / n
    return out


def honest(
    n: int, start: int = 0
) -> tuple[int, list[float], list[float], list[float], list[float]]:
    """False positives over n honest audits (threads 1/2 mixed, verifier engine float32 or
    a float64 reference build every other block of four, T 0 and 1)."""
    p = TinyEngine("tiny")
    # The float64 build is the same model through different kernels and accumulation: the
    # closest thing to "another engine" this CPU-only box can run thousands of times.
    verifiers = (TinyEngine("tiny"), TinyEngine("tiny", dtype="float64"))
    fails, rels, margins, gen, ver = 0, [], [], [], []
    for i in range(start, start + n):
        vt = 1 + (i % 2)
        pt = 1 + (i // 2 % 2)
        v = verifiers[i // 4 % 2]
        verdict, g, w = one_audit(
            p, v, i, 1.0 if i % 3 else 0.0, provider_threads=pt, verifier_threads=vt
        )
        fails += not verdict.passed
        rels.append(verdict.worst_rel)
        margins.append(verdict.worst_margin)
        gen.append(g)
        ver.append(w)
    return fails, rels, margins, gen, ver
