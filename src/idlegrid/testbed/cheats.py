"""Adversarial engines for the cheat matrix, plugged in with `--engine module:Class`.

Each is the tiny engine with one dishonest twist; the agent around it is the honest one,
so every commitment is built the normal way from what the engine did.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from idlegrid.agent.roles.hwprover import HonestProver
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import hwproof as hw
from idlegrid.core.trust.logprobs import TokenLogprobs
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.minilm import MiniLMEngine
from idlegrid.engines.steps import Steps
from idlegrid.engines.tiny import EOS_ID, OFFSET, TinyEngine
from idlegrid.engines.torch_hf import TorchEngine


class OtherModel(TinyEngine):
    """(a) a different model: same shape, other weights."""

    def __init__(self, model_id: str = "tiny", **kw: Any) -> None:
        super().__init__(model_id, **{**kw, "weights_seed": 999})


class LowPrecision(TinyEngine):
    """(b) the right model served in bfloat16."""

    def __init__(self, model_id: str = "tiny", **kw: Any) -> None:
        super().__init__(model_id, **{**kw, "dtype": "bfloat16"})


class Invented(TinyEngine):
    """(c) an invented answer with an honest commitment (hidden states) of that answer."""

    def _pick(self, logits: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
        return random.randrange(OFFSET + 32, OFFSET + 127)


class Truncating(TinyEngine):
    """(d) stops after a few tokens with an end token, billing the answer as complete."""

    cut_after = 3

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Remember where the answer starts."""
        self._start = len(prompt_ids)
        yield from super().generate(prompt_ids, params)

    def _pick(self, logits: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
        if position - self._start >= self.cut_after:
            return EOS_ID
        return super()._pick(logits, seed, position, params)


class Replaying(TinyEngine):
    """(e) answers every prompt with its first answer (tokens and hidden states)."""

    _cache: tuple[list[int], list[np.ndarray]] | None = None

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Serve the cached answer, recording its original hidden states."""
        if self._cache is None:
            toks: list[int] = []
            states: list[np.ndarray] = []
            ids = list(prompt_ids)
            for _ in range(64):
                state = self._last_state(ids)
                tok = self._pick(
                    self.logits_of(state[None, :])[0], params.seed or 0, len(ids), params
                )
                toks.append(tok)
                states.append(state)
                ids.append(tok)
            Replaying._cache = (toks, states)
        assert self._cache is not None
        toks, states = self._cache
        for tok, state in zip(toks, states, strict=True):
            if self.recorder is not None:
                self.recorder.add(tok, state)
            yield tok


class SeedIgnoring(TinyEngine):
    """(f) samples from the right distribution with its own randomness, not the seed."""

    def _pick(self, logits: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
        if params.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / params.temperature
        p = np.exp(z - z.max())
        return int(np.random.default_rng().choice(len(p), p=p / p.sum()))


class LazyVerifier(TinyEngine):
    """(i) a verifier that approves everything: it echoes the commitment's own numbers."""

    def audit(
        self, context_ids: Sequence[int], c: Any, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> Any:
        """A report built from the commitment alone, no recomputation."""
        chunks = tuple(
            cm.ChunkReport(
                ch.values,
                min(abs(v) for v in ch.values),
                (1.0,) * len(ch.tokens),
                (True,) * len(ch.tokens),
            )
            for ch in c.chunks
        )
        return cm.Report(c.header.context_hash, chunks, True, self.det_class())


class Colluder(LazyVerifier):
    """A panelist bribed by the provider: whatever the disputed position really holds, its
    "recompute" is the commitment's own numbers there, so it always votes `provider`."""


# ---- the same twists on the default engine (llama.cpp, gemma3:270m) --------------------


class LlamaInvented(LlamaCppEngine):
    """(c) on llama.cpp: tokens of its own choosing, with honest hidden states of them."""

    def _pick(self, logits: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
        return int(random.choice(np.argsort(logits)[-50:]))  # plausible, but not the draw


class _IgnoresSeed:
    """(f) the right distribution, its own randomness."""

    def _pick(self, logits: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
        if params.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / params.temperature
        p = np.exp(z - z.max())
        return int(np.random.default_rng().choice(len(p), p=p / p.sum()))


class LlamaSeedIgnoring(_IgnoresSeed, LlamaCppEngine):
    """(f) on llama.cpp: the right distribution, its own randomness."""


class TorchSeedIgnoring(_IgnoresSeed, TorchEngine):
    """(f) on the torch engine: the right distribution, its own randomness."""


class LlamaPenaltySkipping(LlamaCppEngine):
    """Commits to the request's penalties and bias but samples without them (cheaper for a
    batched server that shares one sampler)."""

    def _steps(self, ids: Sequence[int], params: SamplingParams) -> Steps:
        return Steps(ids, replace(params, adjust=None), self._n_vocab)


class _InventedSteps(Steps):
    """The honest draw, with logprobs made up: the sampled token reported as certain."""

    def pick(
        self,
        pick: Any,
        logits: np.ndarray,
        seed: int,
        position: int,
        mask: np.ndarray | None = None,
    ) -> int:
        """Sample honestly, then overwrite the reported logprobs."""
        token = super().pick(pick, logits, seed, position, mask)
        if self.last is not None:
            top = tuple((t, -5.0 * (i + 1)) for i, (t, _) in enumerate(self.last.top))
            self.last = TokenLogprobs(token, 0.0, top)
        return token


class LlamaLogprobInventing(LlamaCppEngine):
    """Honest tokens, invented logprobs (committed as sent: the commitment is consistent)."""

    def _steps(self, ids: Sequence[int], params: SamplingParams) -> Steps:
        return _InventedSteps(ids, params, self._n_vocab)


class LlamaPromptInventing(LlamaCppEngine):
    """Echo with logprobs: honest answers, but each prompt token reported as near certain
    (a flattering score, committed as sent: the commitment is consistent)."""

    def score_prompt(self, ids: Sequence[int], on_logits: Any) -> None:
        """The honest scoring pass, each row bent towards the prompt's own next token."""

        def bent(p: int, logits: np.ndarray) -> None:
            z = np.array(logits, dtype=np.float32)
            z[ids[p + 1]] = z.max() + 5.0
            on_logits(p, z)

        super().score_prompt(ids, bent)


class LlamaSchemaIgnoring(LlamaCppEngine):
    """Structured outputs: commits to the request's grammar (the agent does that) but samples
    unconstrained, saving the masks; its seeded draws and fingerprint are otherwise honest."""

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Generate as if no grammar had been asked for."""
        return super().generate(prompt_ids, replace(params, grammar=None))


# ---- cheats on what is paid (issue 15), on the default engine ------------------------


class _Uncommitting:
    """A llama.cpp engine behind the bare `Engine` interface: no recorder and no `audit`, so
    the honest agent around it commits nothing, for whole answers or for failover parts."""

    name = "llama.cpp"

    def __init__(self, model_id: str, **kw: Any) -> None:
        self._inner = LlamaCppEngine(model_id, **kw)
        self.model_id = model_id

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """The model's tokens."""
        return self._inner.tokenize(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """The model's bytes."""
        return self._inner.detokenize(ids)

    def is_end(self, token_id: int) -> bool:
        """The model's end tokens."""
        return self._inner.is_end(token_id)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """The honest tokens."""
        yield from self._inner.generate(prompt_ids, params)

    @property
    def chat_template(self) -> str | None:
        """The model's template."""
        return self._inner.chat_template

    @property
    def context_length(self) -> int:
        """The model's context."""
        return self._inner.context_length

    def describe(self) -> dict[str, Any]:
        """The honest engine's facts."""
        return self._inner.describe()

    def close(self) -> None:
        """Free the model."""
        self._inner.close()


class LlamaUncommitted(_Uncommitting):
    """(p1) honest answers, no commitment: nothing an audit could ever check."""


class LlamaPartDump(_Uncommitting):
    """(p3) delivers the first `cut_after` tokens of an answer, then crashes: the agent hands
    the request back with no part commitment (it has nothing to commit from)."""

    cut_after = 3

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """A few honest tokens, then an engine error."""
        for n, token in enumerate(super().generate(prompt_ids, params)):
            if n == self.cut_after:
                raise RuntimeError("crashed mid-answer (on purpose)")
            yield token


class _Inflated(list[int]):
    """Token ids whose length lies: iterating gives the real ids (so the context, the
    generation and the commitment are honest), `len` says `factor` times more."""

    factor = 3.8

    def __len__(self) -> int:
        return int(super().__len__() * self.factor)


class LlamaPromptInflating(LlamaCppEngine):
    """(p2) honest answers and commitments, but the agent reports 3.8x the prompt tokens
    (`FinishMsg.prompt_tokens` is `len(prompt_ids)`)."""

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """The real ids, with a lying length."""
        return _Inflated(super().tokenize(text, add_bos=add_bos))


PAY_CHEATS = {
    "uncommitted": LlamaUncommitted,
    "inflated-prompt": LlamaPromptInflating,
    "part-dump": LlamaPartDump,
}


class FalseAccuser(TinyEngine):
    """A verifier that recomputes honestly and then reports the last chunk 1% off, so an
    honest provider fails its audit (what disputes exist for)."""

    def audit(
        self, context_ids: Sequence[int], c: Any, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> Any:
        """The honest report with its last chunk's values moved."""
        r = super().audit(context_ids, c, max_new_tokens, stop)
        if len(r.chunks) < len(c.chunks) or not r.chunks:
            return r  # a truncated recompute (a dispute query) that stops before the lie
        last = r.chunks[-1]
        bad = cm.ChunkReport(
            tuple(v * 1.01 for v in last.values), last.kth, last.margins, last.allowed
        )
        return cm.Report(r.context_hash, (*r.chunks[:-1], bad), r.end_ok, r.det_class)


CHEATS = {
    "a": OtherModel,
    "b": LowPrecision,
    "c": Invented,
    "d": Truncating,
    "e": Replaying,
    "f": SeedIgnoring,
}


# ---- hardware cheats: provers plugged into the agent (`make_agent(..., prover=...)`) ----

# (g) claiming a GPU it does not have: an honest prover on this CPU, behind this claim.
CLAIMED_GPU = [{"model": "RTX-4090", "count": 1, "vram_gb": 24.0}]


class PartialProver(HonestProver):
    """(h) computes only part of the product; the other rows are cheap garbage."""

    fraction = 0.5

    def product(self, seed: bytes, n: int, dtype: str) -> np.ndarray:
        """The first `fraction` of the rows of C done honestly, the rest random."""
        bits = hw.VALUE_BITS[dtype]
        done = int(n * self.fraction)
        a = hw.rows_of(seed, "A", list(range(done)), n, bits)
        c = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        c[:done] = a @ hw.matrix(seed, "B", n, bits)
        return c


class LowPrecisionProver(HonestProver):
    """(h) the whole product, but from bfloat16-rounded inputs (a cheaper, wrong product)."""

    def product(self, seed: bytes, n: int, dtype: str) -> np.ndarray:
        """C from inputs rounded to bfloat16."""

        def bf16(x: np.ndarray) -> np.ndarray:
            return ((x.view(np.uint32) + np.uint32(0x8000)) & np.uint32(0xFFFF0000)).view(
                np.float32
            )

        bits = hw.VALUE_BITS[dtype]
        a, b = bf16(hw.matrix(seed, "A", n, bits)), bf16(hw.matrix(seed, "B", n, bits))
        product: np.ndarray = a @ b
        return product


class MiniLMTruncated(MiniLMEngine):
    """Embeddings from a cheaper model: all-MiniLM-L6-v2 cut to its first `layers` layers
    (half the compute at 3), claiming the full model and its determinism class."""

    def __init__(self, model_id: str = "all-minilm:l6-v2", layers: int = 3, **kw: Any) -> None:
        super().__init__(model_id, **kw)
        self._model.encoder.layer = self._model.encoder.layer[:layers]


class MiniLMLowPrecision(MiniLMEngine):
    """Embeddings from the right model run in bfloat16, claiming float32."""

    def __init__(self, model_id: str = "all-minilm:l6-v2", **kw: Any) -> None:
        super().__init__(model_id, **kw)
        self._model = self._model.to(self._torch.bfloat16)


class MiniLMFalseAccuser(MiniLMEngine):
    """A verifier that embeds honestly and then reports every vector turned (its rows
    rolled by one dimension), so an honest provider's embeddings fail their audit."""

    def embed(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        """The honest vectors, each rolled by one dimension (still unit length)."""
        return np.roll(super().embed(inputs), 1, axis=1)
