"""A tiny seeded GPT served as a real engine: bytes in, bytes out, hidden states committed.

It exists so that the trust protocol (commitments, audits, the cheat matrix) can run
thousands of audits on two CPU cores in seconds: same code path as the torch engine
(record the last hidden state per generated token, seeded Gumbel sampling, one-pass
prefill for verification), on a 2-layer model whose weights come from `weights_seed`.
Tokens are bytes as in the fake engine: id = byte + 3; 1 is EOS, 2 is BOS.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from idlegrid.core.trust import sampling
from idlegrid.engines.base import SamplingParams, check_prompt
from idlegrid.engines.commit import Recorder
from idlegrid.engines.steps import Steps
from idlegrid.errors import EngineError

EOS_ID, BOS_ID, OFFSET = 1, 2, 3
VOCAB = 256 + OFFSET


class TinyEngine:
    """A 2-layer, 64-wide GPT with seeded weights; float32 unless `dtype` says otherwise."""

    name = "tiny"

    def __init__(
        self,
        model_id: str = "tiny",
        *,
        model_path: str | None = None,
        threads: int | None = None,
        context_length: int | None = None,
        weights_seed: int = 1234,
        dtype: str = "float32",
        layers: int = 2,
        dim: int = 64,
    ) -> None:
        try:
            import torch

            from idlegrid.training.gpt import GPTConfig, build_stages
        except ImportError as exc:
            raise EngineError("the tiny engine needs torch", engine=self.name) from exc
        self._torch = torch
        self.model_id = model_id
        if threads:
            torch.set_num_threads(threads)
        self._context_length = min(context_length or 256, 256)
        cfg = GPTConfig(vocab=VOCAB, seq=256, layers=layers, dim=dim, heads=4)
        self._model = build_stages(cfg, 1, weights_seed)[0].eval()
        self._dtype = getattr(torch, dtype)
        self._model.to(self._dtype)
        self._body = self._model[:-1]
        self._head = self._model[-1]
        self._dtype_name = dtype
        self.recorder: Recorder | None = None
        self.steps: Steps | None = None  # the current generation's sampler state

    # ---- Engine ------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Byte ids, BOS first when `add_bos`."""
        ids = [b + OFFSET for b in text.encode("utf-8")]
        return [BOS_ID, *ids] if add_bos else ids

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """Bytes of the ids; special ids render as nothing."""
        return bytes(i - OFFSET for i in ids if OFFSET <= i < VOCAB)

    def is_end(self, token_id: int) -> bool:
        """Only EOS ends a generation."""
        return token_id == EOS_ID

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Recompute the context each step (tiny), sample with the request's seed."""
        ids = list(prompt_ids)
        check_prompt(ids, self._context_length, VOCAB)
        seed = params.seed if params.seed is not None else 0
        steps = self.steps = Steps(ids, params, VOCAB)
        while len(ids) < self._context_length:
            state = self._last_state(ids)
            logits = self.logits_of(state[None, :])[0]
            token = steps.pick(self._pick, logits, seed, len(ids))
            if self.recorder is not None:
                self.recorder.add(token, state, steps.last)
            yield token
            ids.append(token)

    def _pick(self, logits: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
        return sampling.choose(logits, seed, position, params.temperature, params.top_p)

    @property
    def chat_template(self) -> str | None:
        """None: chat falls back to a plain transcript."""
        return None

    @property
    def context_length(self) -> int:
        """Maximum tokens per sequence."""
        return self._context_length

    def describe(self) -> dict[str, Any]:
        """Engine facts for the determinism class."""
        return {
            "engine": self.name,
            "version": self._torch.__version__,
            "model": self.model_id,
            "dtype": self._dtype_name,
            "device": "cpu",
            "threads": self._torch.get_num_threads(),
            "context_length": self._context_length,
        }

    def close(self) -> None:
        """Nothing to free beyond the GC."""

    # ---- Auditable ---------------------------------------------------------------------

    def det_class(self) -> str:
        """engine/version/dtype/device/threads."""
        d = self.describe()
        return f"{d['engine']}/{d['version']}/{d['dtype']}/cpu/t{d['threads']}"

    def _states(self, ids: Sequence[int]) -> Any:
        torch = self._torch
        with torch.inference_mode():
            x = self._body(torch.tensor([list(ids)], dtype=torch.long))
            return self._head.ln(x)[0].float()

    def _last_state(self, ids: Sequence[int]) -> np.ndarray:
        out: np.ndarray = self._states(ids)[-1].numpy().copy()
        return out

    def prefill_states(self, ids: Sequence[int]) -> np.ndarray:
        """Last hidden state of every position, one pass."""
        out: np.ndarray = self._states(ids).numpy().copy()
        return out

    def logits_of(self, states: np.ndarray) -> np.ndarray:
        """Logits from hidden states through the output layer (in the serving dtype)."""
        torch = self._torch
        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(states)).to(self._dtype)
            out: np.ndarray = self._head.out(h).float().numpy()
        return out

    def audit(
        self, context_ids: Sequence[int], c: Any, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> Any:
        """Recompute a commitment (verifier mode)."""
        from idlegrid.engines.commit import recompute

        return recompute(self, context_ids, c, max_new_tokens, stop, self._context_length)
