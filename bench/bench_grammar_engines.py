"""Which grammar engine: per-token mask cost on Gemma's 262,144-token vocabulary.

    PYTHONPATH=src python bench/bench_grammar_engines.py [--engines llguidance,xgrammar,outlines]

Each engine gets the tokenizer from the GGUF (llama.cpp's vocabulary, piece bytes as
llama.cpp renders them), compiles the same moderate JSON schema, then walks a valid
instance token by token (the engine's own tokenization of it) computing the full mask at
every step. Reported: tokenizer build, grammar compile, and the median / p90 / max mask
time per token. xgrammar and outlines-core are measured only (they are not dependencies):
install them with `pip install --no-deps --target DIR xgrammar apache-tvm-ffi outlines-core`
and put DIR on PYTHONPATH after src.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "active", "role", "tags", "address", "score"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "active": True,
    "role": "editor",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    "score": 97.5,
}


def pieces(engine: LlamaCppEngine) -> list[bytes]:
    """Every token's bytes as llama.cpp renders them (special tokens as their text)."""
    lib, vocab = engine._lib, engine._vocab
    import ctypes

    buf = ctypes.create_string_buffer(4096)
    out = []
    for t in range(engine._n_vocab):
        n = lib.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
        out.append(buf.raw[: max(n, 0)])
    return out


def walk(mask: Callable[[], None], consume: Callable[[int], None], ids: list[int]) -> list[float]:
    """Mask time (ms) at every step of `ids`."""
    times = []
    for t in ids:
        t0 = time.perf_counter()
        mask()
        times.append((time.perf_counter() - t0) * 1e3)
        consume(t)
    t0 = time.perf_counter()
    mask()  # the final mask (only the end token allowed)
    times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_llguidance(engine: LlamaCppEngine, ids: list[int]) -> dict[str, float]:
    import llguidance
    import llguidance.llamacpp
    import llguidance.numpy

    t0 = time.perf_counter()
    tok = llguidance.llamacpp.lltokenizer_from_vocab(engine._vocab)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    m = llguidance.LLMatcher(tok, grammar)
    assert not m.is_error(), m.get_error()
    t2 = time.perf_counter()
    bitmask = llguidance.numpy.allocate_token_bitmask(1, tok.vocab_size)

    def consume(t: int) -> None:
        assert m.consume_token(t), m.get_error()

    times = walk(lambda: llguidance.numpy.fill_next_token_bitmask(m, bitmask), consume, ids)
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, **_stats(times)}


def run_xgrammar(engine: LlamaCppEngine, ids: list[int]) -> dict[str, float]:
    import torch
    import xgrammar as xgr

    vocab = pieces(engine)
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(
        vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[1]
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)
    m = xgr.GrammarMatcher(compiled)
    t2 = time.perf_counter()
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    assert isinstance(bitmask, torch.Tensor)

    def consume(t: int) -> None:
        assert m.accept_token(t)

    times = walk(lambda: m.fill_next_token_bitmask(bitmask), consume, ids)
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, **_stats(times)}


def run_outlines(engine: LlamaCppEngine, ids: list[int]) -> dict[str, float]:
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    vocab = pieces(engine)
    t0 = time.perf_counter()
    table: dict[Any, list[int]] = {}
    for t, b in enumerate(vocab):
        if t == 1 or not b:
            continue
        table.setdefault(b, []).append(t)
    voc = oc.Vocabulary(1, table)
    t1 = time.perf_counter()
    index = oc.Index(build_regex_from_schema(json.dumps(SCHEMA)), voc)
    guide = oc.Guide(index)
    t2 = time.perf_counter()
    words = (engine._n_vocab + 31) // 32
    bitmask = np.zeros(words, dtype=np.int32)

    def mask() -> None:
        guide.write_mask_into(bitmask.ctypes.data, bitmask.size, bitmask.itemsize)

    times = walk(mask, lambda t: guide.advance(t), ids)
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, **_stats(times)}


def _stats(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    return {
        "steps": len(s),
        "mask_median_ms": statistics.median(s),
        "mask_p90_ms": s[int(0.9 * (len(s) - 1))],
        "mask_max_ms": s[-1],
        "mask_total_ms": sum(s),
    }


RUNNERS = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines": run_outlines}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="llguidance,xgrammar,outlines")
    args = ap.parse_args()
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=1)
    try:
        text = json.dumps(INSTANCE, separators=(",", ":"))
        ids = engine.tokenize(text, add_bos=False)
        print(f"vocabulary {engine._n_vocab}, instance {len(text)} chars / {len(ids)} tokens")
        for name in args.engines.split(","):
            try:
                res = RUNNERS[name](engine, ids)
            except Exception as exc:  # one engine failing must not hide the others
                print(f"{name}: failed: {exc!r}")
                continue
            print(name, json.dumps({k: round(v, 4) for k, v in res.items()}))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
