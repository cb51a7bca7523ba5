"""llama.cpp engine (llama-cpp-python), the default on CPUs, Apple and small GPUs.

Decoding goes through `Llama.eval`, as `Llama.generate` does, but sampling is ours: seeded
Gumbel-max over the nucleus (`core/trust/sampling.py`) on llama.cpp's logits, so that a
verifier replays each choice. llama-cpp-python's sampler chain always carries its defaults
(top-k 40, min-p 0.05, top-p before temperature, repeat penalty in its server), and OpenAI
semantics want none of them; greedy is a plain argmax, as llama.cpp's greedy sampler.
Every call re-evaluates its prompt from position 0, so a generation is a pure function of
(prompt, params) and an auditor can reproduce it bit for bit on the same build.

Commitments (docs/trust.md, "llama.cpp"): with `recorder` set, each decode step also returns
the last hidden state after the final norm (context embeddings on, pooling none: llama.cpp's
`t_embd`, the output layer's input), read in the same pass as the logits. llama.cpp's
batched and one-token kernels give results several per cent apart, so the verifier does not
prefill the answer in one batch: it replays the provider's schedule (the prompt in one
batch, then one token per step), which reproduces the provider's numbers exactly.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from idlegrid.core import grammar
from idlegrid.engines import parallel
from idlegrid.engines.base import SamplingParams, check_prompt
from idlegrid.engines.commit import Recorder
from idlegrid.engines.models import resolve_model
from idlegrid.engines.steps import SeededPick, Steps
from idlegrid.errors import EngineError, InvalidRequest

DEFAULT_CONTEXT = 8192
INSTALL_HINT = "pip install 'idlegrid[llama]'"
# llama_ftype values (general.file_type) -> the names quantizers use
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 12: "Q3_K_M", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
               18: "Q6_K", 32: "BF16"}  # fmt: skip


def grammar_engine_id() -> str | None:
    """The grammar engine this provider constrains with (None: it cannot)."""
    from idlegrid.engines.grammar import engine_id

    return engine_id()


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


def _device(lib: Any, n_gpu_layers: int) -> str:
    """`cpu-<variant>` (the instruction-set level the library was built for) or `gpu-<backend>`.

    AVX2 and AVX-512 builds of one llama.cpp give different decode numbers (docs/trust.md),
    so the variant is part of the determinism class and verifiers are matched on it.
    """
    from idlegrid.engines.llama_build import variant_of

    info = lib.llama_print_system_info()
    info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    if n_gpu_layers:
        lowered = info.lower()
        backend = next(
            (b for b in ("cuda", "metal", "vulkan", "hip", "sycl") if b in lowered), "gpu"
        )
        return f"gpu-{backend}"
    return f"cpu-{variant_of(info)}"


class LlamaCppEngine(SeededPick):
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
                # Per-token hidden states when embeddings are switched on for a commitment.
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
                verbose=False,
                **options,
            )
        except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError on load
            raise EngineError(
                f"llama.cpp could not load {self._path}: {exc}", engine=self.name, detail=repr(exc)
            ) from exc
        self._n_gpu_layers = n_gpu_layers
        self._device = _device(llama_cpp, n_gpu_layers)
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
        self._n_embd = self._llm.n_embd()
        self._embeddings_on = False
        self._serial = 0  # generations started; a deferred state belongs to one of them
        self._grammars: Any = None  # engines/grammar.Grammars, built on the first constraint
        self.recorder: Recorder | None = None  # set by the agent to commit one generation
        self.steps: Steps | None = None  # the current generation's sampler state
        self._replayer: Any = None  # engines/batched.BatchedLlama replaying batched answers
        self._replayer_key: tuple[int, int, int] = (0, 0, 0)
        # This context outside generation (prompt scoring, audits): with --parallel every
        # batched slot reaches it through the same engine, from its own thread.
        self.context_lock = threading.RLock()

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
        """Evaluate the prompt from scratch, then sample one token per decode step.

        With `recorder` set, the hidden state behind every token is recorded; the first one
        (the prompt's last position) only after the answer, see `_complete`.
        """
        ids = list(prompt_ids)
        check_prompt(ids, self._context_length, self._n_vocab)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        llm, rec = self._llm, self.recorder
        self._serial += 1
        serial = self._serial
        llm.reset()  # forget cached state: outputs must not depend on earlier calls
        self._embeddings(False)  # else llama.cpp computes logits for every prompt token
        llm.eval(ids)
        if rec is not None:
            rec.complete = lambda r: self._complete(r, ids, serial)
        limit, n = self._context_length, len(ids)
        state: np.ndarray | None = None
        steps = self.steps = self._steps(ids, params)
        matcher = self.matcher(params.grammar, params.grammar_prefix) if params.grammar else None
        while True:
            # penalties and bias, then the grammar's mask (forbidden tokens at −inf), then
            # temperature and top-p: engines/steps
            mask = matcher.mask() if matcher is not None else None
            token_id = steps.pick(self._pick, self._logits(), seed, n, mask)
            if matcher is not None and not matcher.consume(token_id):
                raise EngineError("sampled a token the grammar forbids", engine=self.name)
            if rec is not None:
                state = state if state is not None else np.zeros(self._n_embd)
                rec.add(token_id, state, steps.last)
            yield token_id
            n += 1
            if llm.n_tokens >= limit:
                return
            if rec is not None:
                self._embeddings(True)  # one-token batches: same logits, plus the state
            llm.eval([token_id])
            if rec is not None:
                state = self._embedding()

    def score_prompt(
        self, ids: Sequence[int], on_logits: Callable[[int, np.ndarray], None]
    ) -> None:
        """Each prompt position's logits, in order, to `on_logits` (valid during the call): a
        pass of its own, in batches of the engine's batch size with every row's logits, so
        the answer's decoding (and its commitment) is untouched. The last position is not
        scored: nothing in the prompt follows it."""
        with self.context_lock:
            self._score(list(ids), on_logits)

    def _score(self, ids: list[int], on_logits: Callable[[int, np.ndarray], None]) -> None:
        check_prompt(ids, self._context_length, self._n_vocab)
        lib, llm = self._lib, self._llm
        llm.reset()
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        self._embeddings(False)
        step = max(1, int(llm.n_batch))
        batch = lib.llama_batch_init(step, 0, 1)
        try:
            for lo in range(0, len(ids) - 1, step):
                part = ids[lo : min(lo + step, len(ids) - 1)]
                for i, tok in enumerate(part):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, lo + i, 1
                    batch.seq_id[i][0], batch.logits[i] = 0, True
                batch.n_tokens = len(part)
                if lib.llama_decode(self._ctx, batch) != 0:
                    raise EngineError("llama_decode failed scoring the prompt", engine=self.name)
                for i in range(len(part)):
                    row = lib.llama_get_logits_ith(self._ctx, i)
                    on_logits(lo + i, np.ctypeslib.as_array(row, shape=(self._n_vocab,)))
        finally:
            lib.llama_batch_free(batch)
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
            llm.reset()

    def _steps(self, ids: Sequence[int], params: SamplingParams) -> Steps:
        return Steps(ids, params, self._n_vocab)

    def matcher(self, spec: grammar.GrammarSpec, prefix: Sequence[int] = ()) -> Any:
        """A grammar matcher over this model's vocabulary, advanced over `prefix`."""
        if self._grammars is None:
            from idlegrid.engines.grammar import Grammars

            self._grammars = Grammars(self._vocab, self._n_vocab)
        return self._grammars.matcher(spec, prefix)

    def _complete(self, rec: Recorder, ids: list[int], serial: int) -> None:
        """Fill in the first state: the prompt's last position, recomputed as one token.

        The prompt ran as one batch without embeddings (the first token's logits are what
        they always were); re-running its last token alone now, over the batch's cache of
        the positions before it, cannot change any token already generated. The verifier
        does the same.
        """
        if serial != self._serial:
            raise EngineError(
                "the engine ran another generation before the commitment", engine=self.name
            )
        if rec.tokens:
            rec.states[0] = self._last_prompt_state(ids)

    def _last_prompt_state(self, ids: list[int]) -> np.ndarray:
        llm = self._llm
        llm.n_tokens = len(ids) - 1  # eval drops the cache from here on
        self._embeddings(True)
        llm.eval(ids[-1:])
        return self._embedding()

    def _embeddings(self, on: bool) -> None:
        if on != self._embeddings_on:
            self._lib.llama_set_embeddings(self._ctx, on)
            self._embeddings_on = on

    def _logits(self) -> np.ndarray:
        """The last position's logits, a view valid until the next decode."""
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _embedding(self) -> np.ndarray:
        ptr = self._lib.llama_get_embeddings_ith(self._ctx, -1)
        if not ptr:
            raise EngineError("llama.cpp returned no hidden state", engine=self.name)
        return np.ctypeslib.as_array(ptr, shape=(self._n_embd,)).copy()

    # ---- Auditable -------------------------------------------------------------------

    def det_class(self) -> str:
        """engine/version/dtype/device/threads, as the coordinator builds it from describe()."""
        d = self.describe()
        return f"{d['engine']}/{d['version']}/{d['dtype']}/{d['device']}/t{d['threads']}"

    def replay_states(
        self,
        context_ids: Sequence[int],
        tokens: Sequence[int],
        on_logits: Callable[[int, np.ndarray], None],
        schedule: Any = None,
    ) -> np.ndarray:
        """Hidden states at each committed position, on the provider's schedule.

        A batched answer (`schedule`: core/trust/schedule.Schedule) is replayed by
        `_replay_batched`; the rest of this docstring is about answers decoded alone.

        The context in one batch, then one token per step, as `generate` ran; each position's
        logits go to `on_logits` (valid only during the call). The first state, the prompt's
        last position computed alone, comes last, exactly as the provider's `_complete` made
        it after its answer: so the context is evaluated once, not twice.
        """
        ctx = list(context_ids)
        check_prompt(ctx, self._context_length, self._n_vocab)
        if schedule is not None:
            return self._replay_batched(ctx, tokens, on_logits, schedule)
        if any(not 0 <= t < self._n_vocab for t in tokens):
            raise EngineError("committed token id out of range", engine=self.name)
        if len(ctx) + len(tokens) > self._context_length + 1:
            raise EngineError("commitment longer than the context", engine=self.name)
        llm = self._llm
        llm.reset()
        self._embeddings(False)
        llm.eval(ctx)
        on_logits(0, self._logits())
        self._embeddings(True)
        states = np.empty((len(tokens), self._n_embd), dtype=np.float32)
        for r, tok in enumerate(tokens[:-1], start=1):
            llm.eval([tok])
            states[r] = self._embedding()
            on_logits(r, self._logits())
        states[0] = self._last_prompt_state(ctx)
        return states

    def _replay_batched(
        self,
        ctx: list[int],
        tokens: Sequence[int],
        on_logits: Callable[[int, np.ndarray], None],
        schedule: Any,
    ) -> np.ndarray:
        """Replay on the recorded batch shapes: 2·widest − 1 slots, the answer in the middle
        one (engines/batched.BatchedLlama.replay); the context is sized to this answer."""
        from idlegrid.engines.batched import BatchedLlama

        need = -(-(len(ctx) + len(tokens) + 1) // 256) * 256
        key = (2 * schedule.widest - 1, schedule.chunk, min(need, self._context_length))
        if self._replayer is None or self._replayer_key != key:
            if self._replayer is not None:
                self._replayer.close()
            self._replayer = None
            self._replayer = BatchedLlama(self, key[0], chunk=key[1], context_per_seq=key[2])
            self._replayer_key = key
        states: np.ndarray = self._replayer.replay(ctx, tokens, schedule.shapes, on_logits)
        return states

    def audit(
        self,
        context_ids: Sequence[int],
        c: Any,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        constraint: Any = None,
    ) -> Any:
        """Recompute a commitment (verifier mode); `constraint` replays the request's grammar."""
        from idlegrid.engines.commit import recompute

        with self.context_lock:
            return recompute(
                self, context_ids, c, max_new_tokens, stop, self._context_length, constraint
            )

    @property
    def chat_template(self) -> str | None:
        """`tokenizer.chat_template` from the GGUF metadata (None for base models)."""
        return self._chat_template

    @property
    def context_length(self) -> int:
        """Maximum tokens per sequence: the context size, at most the trained length."""
        return self._context_length

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of a sequence takes (F16, every layer, from the model's
        metadata; sliding-window layers counted in full, a margin on the safe side)."""
        lib, model = self._lib, self._llm.model
        arch = self._llm.metadata.get("general.architecture", "")
        n_head = max(1, lib.llama_model_n_head(model))
        head = self._n_embd // n_head

        def meta(key: str) -> int:
            return int(self._llm.metadata.get(f"{arch}.attention.{key}", head))

        return parallel.kv_bytes_per_token(
            lib.llama_model_n_layer(model),
            lib.llama_model_n_head_kv(model),
            meta("key_length"),
            meta("value_length"),
        )

    def describe(self) -> dict[str, Any]:
        """Engine facts for the determinism class."""
        return {
            "engine": self.name,
            "version": getattr(self._lib, "__version__", "unknown"),
            "model": self.model_id,
            "model_file": self._path.name,
            "dtype": self._file_type(),
            "device": self._device,
            "threads": self._threads,
            "context_length": self._context_length,
            # Structured outputs: the gateway routes constrained requests only to engines
            # that name their grammar engine here.
            "grammar": grammar_engine_id(),
        }

    def _file_type(self) -> str:
        raw = self._llm.metadata.get("general.file_type", "")
        return _FILE_TYPES.get(int(raw), f"ftype{raw}") if raw.isdigit() else "gguf"

    def close(self) -> None:
        """Free the model and its context."""
        replayer, self._replayer = getattr(self, "_replayer", None), None
        if replayer is not None:
            replayer.close()
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.close()
