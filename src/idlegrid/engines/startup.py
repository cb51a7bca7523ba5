"""The engine's start-up check: load the model and decode a few tokens in a child process.

Native engines die by signal, not by exception: a llama.cpp wheel built for another CPU
raises SIGILL, a broken model file SIGSEGV, too little memory an OOM kill. In the agent's own
process that is a silent death with nothing in the log but a banner. Run first in a child,
the same failure becomes an `EngineCrashed` that names the signal, the engine, the model and
the likely fix; the agent and `scripts/bootstrap` both report it.

    python -m idlegrid.engines.startup --engine llama.cpp --model gemma3:270m
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from idlegrid.errors import EngineCrashed, EngineError

PROBE_TOKENS = 4
_HINTS = {
    "SIGILL": "the engine's native code uses CPU instructions this machine cannot run (a wheel "
    "built with -march=native, or on another CPU, or AMX/AVX-512 state the VM did not "
    "enable): rebuild the portable engine with scripts/bootstrap "
    "(IDLEGRID_LLAMA_CPU=x86-64-v3, or x86-64 for the oldest CPUs)",
    "SIGKILL": "killed from outside, most often by the kernel's OOM killer: the model needs "
    "more memory than is free; serve a smaller model or free memory",
    "SIGSEGV": "a crash in native code: an engine built for another CPU (a -march=native "
    "llama.cpp with AMX kernels dies this way on VMs that do not enable AMX), or a "
    "damaged or unsupported model file: rebuild the portable engine with "
    "scripts/bootstrap, then check the file",
    "SIGBUS": "the model file could not be read through its memory map (truncated, or on a "
    "failing disk); download it again",
    "SIGABRT": "the engine aborted on an internal check; its message is in the log above",
}


def check_engine(
    engine: str,
    model: str,
    *,
    model_path: str | None = None,
    threads: int | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Load `engine` with `model` in a child and decode a few tokens; raise if it cannot."""
    cmd = [sys.executable, "-m", "idlegrid.engines.startup", "--engine", engine, "--model", model]
    if model_path:
        cmd += ["--model-path", str(model_path)]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        raise EngineError(
            f"the {engine} engine did not load {model} and decode "
            f"{PROBE_TOKENS} tokens within {timeout_s:.0f} s",
            engine=engine,
            detail="timeout",
        ) from exc
    tail = _tail(proc.stderr)
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise EngineCrashed(
            engine=engine,
            model=model,
            signal=sig,
            hint=_HINTS.get(sig, "see the engine's output above"),
            tail=tail,
        )
    if proc.returncode != 0:
        last = tail.splitlines()[-1] if tail else f"exit status {proc.returncode}"
        raise EngineError(
            f"the {engine} engine could not start {model}: {last}", engine=engine, detail=tail
        )
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _child(engine: str, model: str, model_path: str | None, threads: int | None) -> int:
    from idlegrid.engines.base import SamplingParams
    from idlegrid.engines.registry import load_engine

    kwargs: dict[str, Any] = {"threads": threads}
    if model_path:
        kwargs["model_path"] = model_path
    try:
        eng = load_engine(engine, model, **kwargs)
    except EngineError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    ids = eng.tokenize("The capital of France is")
    began = time.perf_counter()
    out = []
    for tok in eng.generate(ids, SamplingParams(temperature=0.0)):
        out.append(tok)
        if len(out) >= PROBE_TOKENS:
            break
    elapsed = time.perf_counter() - began
    d = eng.describe()
    eng.close()
    print(
        json.dumps(
            {
                "engine": d.get("engine", engine),
                "device": d.get("device"),
                "version": d.get("version"),
                "tokens": out,
                "decode_tps": len(out) / elapsed if elapsed > 0 else 0.0,
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process."""
    p = argparse.ArgumentParser(prog="idlegrid.engines.startup")
    p.add_argument("--engine", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--model-path")
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    return _child(a.engine, a.model, a.model_path, a.threads)


if __name__ == "__main__":
    sys.exit(main())
