"""llama.cpp builds side by side: decode tokens/s, crashes, and whether their numbers agree.

    PYTHONPATH=src python bench/bench_llama_build.py --rounds 5 --tokens 64 \
        --wheel x86-64-v3=WHEEL --wheel x86-64-v4=WHEEL --wheel native=WHEEL

Each build is a llama-cpp-python wheel (`scripts/bootstrap` keeps ours under
~/.cache/idlegrid/wheels/<key>/; a native one is what plain `pip wheel llama-cpp-python`
makes). Each wheel is unpacked once and run in child processes with it first on the path, so
one bad build dies alone (the exit signal is reported) and the others still run. Rounds
alternate between builds so machine load hits all alike; the baseline is the first wheel
named, and the table gives medians and each build's ratio to it. Decode rate counts from
the first generated token to the last, greedy, with the idlegrid engine (our sampler).
Agreement: the last hidden state and logits of the first decode steps, against the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PROMPT = "Write a short letter to a friend about the weather in the mountains."
CHILD = r"""
import json, sys, time
import numpy as np
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.commit import Recorder
from idlegrid.engines.llamacpp import LlamaCppEngine
threads, tokens, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
eng = LlamaCppEngine("gemma3:270m", threads=threads, context_length=1024)
ids = eng.tokenize(sys.argv[4])
list(zip(range(4), eng.generate(ids, SamplingParams(temperature=0.0))))  # warm-up
stamps = []
for _ in eng.generate(ids, SamplingParams(temperature=0.0)):
    stamps.append(time.perf_counter())
    if len(stamps) > tokens:
        break
rate = tokens / (stamps[-1] - stamps[0])
rec = Recorder()
eng.recorder = rec
steps = []
for i, tok in enumerate(eng.generate(ids, SamplingParams(temperature=0.0))):
    steps.append(eng._logits().copy())
    if i >= 8:
        break
states = np.array(rec.states[1:9])
np.savez(out, logits=np.array(steps[1:9]), states=states)
print(json.dumps({"decode_tps": rate, "device": eng.describe()["device"]}))
"""


def unpack(wheel: Path, into: Path) -> Path:
    """The wheel's files in a folder of their own (a wheel is a zip)."""
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(into)
    for so in (into / "llama_cpp" / "lib").glob("*.so*"):
        so.chmod(0o755)
    return into


def run_one(site: Path, threads: int, tokens: int, out: Path) -> dict[str, object]:
    """One child with this build first on the path: its rate, or the signal it died of."""
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{src}"}
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(tokens), str(out), PROMPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if p.returncode < 0:
        return {"crash": signal.Signals(-p.returncode).name}
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1]}
    result: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Alternate the builds for `--rounds`, then print medians, ratios and agreement."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", action="append", required=True, help="NAME=PATH, baseline first")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args()
    builds = dict(w.split("=", 1) for w in a.wheel)
    names = list(builds)
    tmp = Path(tempfile.mkdtemp(prefix="bench-llama-"))
    sites = {n: unpack(Path(p), tmp / n) for n, p in builds.items()}
    print(
        f"machine: {os.cpu_count()} cores; {a.rounds} rounds of {a.tokens} tokens, "
        f"baseline {names[0]}"
    )
    for threads in (int(t) for t in a.threads.split(",")):
        rates: dict[str, list[float]] = {n: [] for n in names}
        fate: dict[str, str] = {}
        for _ in range(a.rounds):
            for n in names:
                if n in fate and fate[n] != "ok":
                    continue
                res = run_one(sites[n], threads, a.tokens, tmp / f"{n}-{threads}.npz")
                if "decode_tps" in res:
                    rates[n].append(float(res["decode_tps"]))  # type: ignore[arg-type]
                    fate[n] = "ok"
                    fate[f"{n}:device"] = str(res["device"])
                else:
                    fate[n] = str(res.get("crash") or res.get("error"))
        base = statistics.median(rates[names[0]]) if rates[names[0]] else float("nan")
        ref = np.load(tmp / f"{names[0]}-{threads}.npz") if rates[names[0]] else None
        print(f"\nthreads {threads}")
        print(
            f"{'build':12} {'device class part':32} {'decode tok/s':>13} {'ratio':>6}  "
            "hidden rel. diff   max |logit diff|"
        )
        for n in names:
            if not rates[n]:
                print(f"{n:12} {'':32} {'dies: ' + fate.get(n, '?'):>13}")
                continue
            med = statistics.median(rates[n])
            diff = ""
            if ref is not None:
                got = np.load(tmp / f"{n}-{threads}.npz")
                hs = np.abs(got["states"] - ref["states"]).max() / np.abs(ref["states"]).max()
                lg = np.abs(got["logits"] - ref["logits"]).max()
                diff = f"{hs:17.2e}   {lg:.3f}"
            print(f"{n:12} {fate[f'{n}:device']:32} {med:13.1f} {med / base:6.3f}  {diff}")


if __name__ == "__main__":
    main()
