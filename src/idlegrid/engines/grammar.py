"""The grammar engine (llguidance) behind a small interface, imported lazily.

Chosen by measurement on Gemma's 262,144-token vocabulary (docs/structured-outputs.md):
a mask costs ~0.02 ms a token (median), a JSON schema compiles in ~1 ms per request, and the
wheel has no dependencies (xgrammar needs torch, transformers and triton; outlines-core
takes seconds to index a schema). The tokenizer is built once per engine from the GGUF's
own vocabulary through llama.cpp (~1.5 s), so masks are over exactly the provider's token ids.

JSON is compiled without flexible whitespace: the answer is compact JSON, which gives a
small model nowhere to wander (runs of newlines) and makes the accept state reachable.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np

from idlegrid.core import tools
from idlegrid.core.grammar import GrammarSpec
from idlegrid.errors import EngineError, InvalidRequest

LIBRARY = "llguidance"
INSTALL_HINT = "pip install 'idlegrid[llama]'"
_OPTIONS = {"whitespace_flexible": False}


def engine_id() -> str | None:
    """`llguidance/<version>` when the library is installed (no import), else None."""
    try:
        return f"{LIBRARY}/{metadata.version(LIBRARY)}"
    except metadata.PackageNotFoundError:
        return None


def _lib() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise EngineError(
            f"structured outputs need {LIBRARY}: {INSTALL_HINT}", engine=LIBRARY
        ) from exc
    return llguidance


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for a spec (tools: a Lark grammar embedding JSON schemas)."""
    lib = _lib()
    if spec.kind == tools.KIND:
        return str(lib.LLMatcher.grammar_from_lark(tools.lark(spec)))
    return str(lib.LLMatcher.grammar_from_json_schema(spec.schema_obj(), overrides=_OPTIONS))


def check(spec: GrammarSpec) -> None:
    """Refuse (400 naming response_format, or tools) a schema the grammar engine cannot
    compile.

    Needs no tokenizer, so the gateway can run it; without the library it checks nothing
    (the provider's compile then refuses)."""
    if engine_id() is None:
        return
    lib = _lib()
    try:
        text = grammar_text(spec)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON schema: {exc}", param=spec.param) from exc
    err = lib.LLMatcher.validate_grammar(text)
    if err:
        raise InvalidRequest(f"JSON schema not supported: {err}", param=spec.param)


class Matcher:
    """One answer's grammar state: the mask for the next token, advanced token by token."""

    def __init__(self, tokenizer: Any, spec: GrammarSpec, n_vocab: int) -> None:
        lib = _lib()
        self._m = lib.LLMatcher(tokenizer, grammar_text(spec), log_level=0)
        if self._m.is_error():
            raise InvalidRequest(
                f"JSON schema not supported: {self._m.get_error()}", param=spec.param
            )
        self._words = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def mask(self) -> np.ndarray:
        """Bitmask of the tokens allowed next (int32 words, bit set = allowed)."""
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if self._m.is_error():
            raise EngineError(f"grammar: {self._m.get_error()}", engine=LIBRARY)
        return self._words

    def consume(self, token: int) -> bool:
        """Advance over a chosen token; False if the grammar does not allow it."""
        return bool(self._m.consume_token(int(token)))

    def consume_all(self, tokens: Sequence[int]) -> bool:
        """Advance over tokens an earlier attempt delivered (failover)."""
        return all(self.consume(t) for t in tokens)


def _tokenizer(vocab: Any, n_vocab: int) -> Any:
    """llguidance's tokenizer over a llama.cpp vocabulary: every piece's bytes, control tokens
    marked (0xff prefix) so no text can produce them, and llama.cpp's own tokenize for text.

    As `llguidance.llamacpp.lltokenizer_from_vocab`, but through llama_vocab_get_attr (the
    helper's llama_token_get_attr warns once per token: 262,144 deprecation warnings)."""
    import ctypes

    import llama_cpp

    lib = _lib()
    buf = ctypes.create_string_buffer(16 * 1024)
    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    user = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    tokens: list[bytes] = []
    for t in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
        if n < 0:
            raise EngineError(f"token {t} has a piece over {len(buf)} bytes", engine=LIBRARY)
        tok = buf.raw[:n]
        attr = llama_cpp.llama_vocab_get_attr(vocab, t)
        if attr & control or (attr & user and tok.startswith(b"<") and tok.endswith(b">")):
            tok = b"\xff" + tok
        tokens.append(tok)
    tokens += [b""] * (n_vocab - len(tokens))
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return lib.LLTokenizer.from_llamacpp(
        tokens=tokens,
        vocab_ptr=vocab,
        tokenize_fptr=tokenize,
        eos_token=llama_cpp.llama_vocab_eos(vocab),
        slices=None,
    )


class Grammars:
    """Matchers over one llama.cpp model's vocabulary; the tokenizer is built on first use."""

    def __init__(self, vocab: Any, n_vocab: int) -> None:
        self._vocab, self._n_vocab = vocab, n_vocab
        self._tokenizer: Any = None

    def matcher(self, spec: GrammarSpec, prefix: Sequence[int] = ()) -> Matcher:
        """A matcher for `spec`, advanced over `prefix` (tokens already in the answer)."""
        if self._tokenizer is None:
            self._tokenizer = _tokenizer(self._vocab, self._n_vocab)
        m = Matcher(self._tokenizer, spec, self._n_vocab)
        if not m.consume_all(prefix):
            raise InvalidRequest("earlier output does not fit the grammar", param=spec.param)
        return m
