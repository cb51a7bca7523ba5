"""llama.cpp engine (llama-cpp-python), the default on CPUs, Apple and small GPUs.

Decoding goes through `Llama.eval`, as `Llama.generate` does, but sampling uses our own
llama.cpp sampler chain: llama-cpp-python's chain always carries its defaults (top-k 40,
min-p 0.05, top-p before temperature), and OpenAI semantics want none of them. Every
call re-evaluates its prompt from position 0, so a generation is a pure function of
(prompt, params) and an auditor can reproduce it bit for bit on the same build.
"""

from __future__ import annotations

import ctypes
import inspect
import os
from collections.abc import Iterator, Sequence
from typing import Any

from idlegrid.engines.base import SamplingParams, check_prompt
from idlegrid.engines.models import resolve_model
from idlegrid.errors import EngineError, InvalidRequest

DEFAULT_CONTEXT = 8192
INSTALL_HINT = "pip install 'idlegrid[llama]'"
_UINT32 = 0xFFFFFFFF  # llama.cpp seeds are uint32; this value means "random"
# llama_ftype values (general.file_type) -> the names quantizers use
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 12: "Q3_K_M", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
               18: "Q6_K", 32: "BF16"}  # fmt: skip


def default_threads() -> int:
    """Compute threads by default: the cores this process may use, less one.

    The spare core keeps the agent's own event loop responsive, and it matters more than
    it looks: llama.cpp's threads meet at a barrier after every op, so when one core is
    taken by anything else, all-core decoding collapses (measured on 2 cores with one
    busy: 0.5 tok/s on 2 threads against 35 tok/s on 1).
    """
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def llama_seed(seed: int) -> int:
    """Map any int seed to a llama.cpp uint32 seed that is never the 'random' sentinel."""
    s = seed & _UINT32
    return s if s != _UINT32 else 0x7FFFFFFF


class LlamaCppEngine:
    """A GGUF model run by llama.cpp through llama-cpp-python."""

    name = "llama.cpp"

    def __init__(
        self,
        model_id: str,
        *,
        model_path: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        context_length: int | None = None,
        n_gpu_layers: int | None = None,
    ) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise EngineError(
                f"the llama.cpp engine needs llama-cpp-python: {INSTALL_HINT}",
                engine=self.name,
                detail=str(exc),
            ) from exc
        self._lib = llama_cpp
        spec = resolve_model(model_id, model_path=model_path)
        self.model_id = spec.id
        self._path = spec.gguf_path
        self._threads = threads or default_threads()
        if n_gpu_layers is None:
            n_gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        options: dict[str, Any] = {}
        if "swa_full" in inspect.signature(llama_cpp.Llama).parameters:
            # A window-sized cache for sliding-window layers (Gemma 3): less memory, the same
            # tokens out, and no "full-size SWA cache" notice on stderr.
            options["swa_full"] = False
        try:
            self._llm: Any = llama_cpp.Llama(
                model_path=str(self._path),
                n_ctx=context_length or DEFAULT_CONTEXT,
                n_threads=self._threads,
                n_threads_batch=self._threads,
                n_gpu_layers=n_gpu_layers,
                verbose=False,
                **options,
            )
        except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError on load
            raise EngineError(
                f"llama.cpp could not load {self._path}: {exc}", engine=self.name, detail=repr(exc)
            ) from exc
        self._n_gpu_layers = n_gpu_layers
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        # Older bindings name it llama_token_is_eog; both take the vocab.
        is_eog = getattr(llama_cpp, "llama_vocab_is_eog", None)
        self._is_eog = is_eog or llama_cpp.llama_token_is_eog
        self._ctx = self._llm.ctx
        self._n_vocab = self._llm.n_vocab()
        trained = self._llm._model.n_ctx_train()
        self._context_length = min(self._llm.n_ctx(), trained)
        self._chat_template = self._llm.metadata.get("tokenizer.chat_template")
        self._pieces: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids; special tokens written in `text` are parsed, as llama-server does."""
        ids: list[int] = self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        return ids

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """UTF-8 bytes of the ids; control tokens render as nothing."""
        # Not Llama.detokenize: it drops a leading space after BOS and truncates pieces
        # longer than 32 bytes (Gemma has hundreds).
        pieces = self._pieces
        out = []
        for i in ids:
            piece = pieces.get(i)
            if piece is None:
                piece = pieces[i] = self._piece(i)
            out.append(piece)
        return b"".join(out)

    def _piece(self, token_id: int) -> bytes:
        if not 0 <= token_id < self._n_vocab:
            raise InvalidRequest(f"token id {token_id} out of range", param="tokens")
        to_piece = self._lib.llama_token_to_piece
        n = to_piece(self._vocab, token_id, self._buf, len(self._buf), 0, False)
        if n < 0:
            self._buf = ctypes.create_string_buffer(-n)
            n = to_piece(self._vocab, token_id, self._buf, -n, 0, False)
        return self._buf.raw[:n]

    def is_end(self, token_id: int) -> bool:
        """EOS, Gemma's <end_of_turn> and every other end-of-generation token."""
        return bool(self._is_eog(self._vocab, token_id))

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Evaluate the prompt from scratch, then sample one token per decode step."""
        ids = list(prompt_ids)
        check_prompt(ids, self._context_length, self._n_vocab)
        sampler = self._sampler(params)
        llm, sample, ctx = self._llm, self._lib.llama_sampler_sample, self._ctx
        try:
            llm.reset()  # forget cached state: outputs must not depend on earlier calls
            llm.eval(ids)
            limit = self._context_length
            while True:
                token_id = sample(sampler, ctx, -1)
                yield token_id
                if llm.n_tokens >= limit:
                    return
                llm.eval([token_id])
        finally:
            self._lib.llama_sampler_free(sampler)

    def _sampler(self, params: SamplingParams) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        # Temperature first, then top-p, as in OpenAI, vLLM and transformers.
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        if params.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(llama_seed(seed)))
        return chain

    @property
    def chat_template(self) -> str | None:
        """`tokenizer.chat_template` from the GGUF metadata (None for base models)."""
        return self._chat_template

    @property
    def context_length(self) -> int:
        """Maximum tokens per sequence: the context size, at most the trained length."""
        return self._context_length

    def describe(self) -> dict[str, Any]:
        """Engine facts for the determinism class."""
        return {
            "engine": self.name,
            "version": getattr(self._lib, "__version__", "unknown"),
            "model": self.model_id,
            "model_file": self._path.name,
            "dtype": self._file_type(),
            "device": "gpu" if self._n_gpu_layers else "cpu",
            "threads": self._threads,
            "context_length": self._context_length,
        }

    def _file_type(self) -> str:
        raw = self._llm.metadata.get("general.file_type", "")
        return _FILE_TYPES.get(int(raw), f"ftype{raw}") if raw.isdigit() else "gguf"

    def close(self) -> None:
        """Free the model and its context."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.close()
