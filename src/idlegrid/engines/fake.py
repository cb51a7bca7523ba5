"""A deterministic, dependency-free engine for fast tests of the coordinator and agent.

It is a real `Engine`, not a mock:

- Tokens are bytes: id = byte + 3; 0 is PAD, 1 is EOS (the only end token), 2 is BOS.
- Output is words (readable lowercase ASCII unless `words` says otherwise; non-ASCII words
  exercise UTF-8 split across tokens), each followed by a space. The next token is a pure
  function of the whole context (and, when sampling, of the seed), so a continuation from
  any prefix of an earlier output reproduces that output exactly. Temperature 0 ignores
  the seed; temperature > 0 uses the seed, or a fresh random one when the seed is None.
  top_p is ignored.
- EOS is produced only when the context contains `END_MARKER`: once the context holds
  `END_AFTER_WORDS` spaces after the marker's last occurrence, the next word boundary is
  EOS (and so is every token after it: an EOS is never a word). Without the marker the
  engine never ends by itself.
- `token_delay` seconds (or env `IDLEGRID_FAKE_TOKEN_DELAY`) are slept before each token,
  so that tests can make a provider slow enough to kill mid-stream.
- It commits like every honest engine (`engines/commit.py`): the "hidden state" that
  produced a token is `HIDDEN` float32 values, the token id / 256 and pseudo-random values
  in [-1, 1) from (context hash, seed), all exact in float32; its logits put the token it
  would pick far above the rest. A FakeEngine verifier recomputes both exactly, so an
  honest fake passes its audits bit-exact and a fake that lies about a token, the seed or
  the context fails them, through the same commitment, recompute and judge as llama.cpp.
- Penalties, logit_bias and logprobs go through the shared sampler (`engines/steps.py`) on
  those logits: the pick sits 90 above every other token, so no penalty and no seeded
  draw at T ≤ 2 moves it (90 / 2 > `NOISE_RANGE`), but a bias of +100 lifts a token over
  it and -100 sinks it, as on a real model. Without them the pick is taken directly.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from idlegrid.engines.base import SamplingParams, wants_steps
from idlegrid.errors import EngineError, InvalidRequest

if TYPE_CHECKING:
    import numpy as np

    from idlegrid.engines.commit import Recorder

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
OFFSET = 3
VOCAB_SIZE = 256 + OFFSET
END_MARKER = "<|end|>"
END_AFTER_WORDS = 4
DELAY_ENV = "IDLEGRID_FAKE_TOKEN_DELAY"
HIDDEN = 8  # width of the fake hidden state
_LOSER = -90.0  # logit of every token the fake would not pick (see the module docstring)

WORDS = (
    "grid", "idle", "power", "token", "river", "stone", "cloud", "lamp", "orbit", "paper",
    "signal", "cedar", "ember", "field", "honey", "iron", "jade", "kite", "lemon", "maple",
    "night", "ocean", "pixel", "quartz", "raven", "silver", "tiger", "umber", "velvet",
    "willow", "amber", "bright", "calm", "delta", "early", "frost", "green", "hollow", "inner",
    "jolly", "keen", "lunar", "mellow", "noble", "olive", "prime", "quiet", "rapid", "solar",
    "tidal", "urban", "vivid", "warm", "yellow", "zesty", "alpha", "bravo", "comet", "dune",
    "echo", "flint", "glow", "harbor",
)  # fmt: skip

_MASK = (1 << 64) - 1
_SPACE = ord(" ") + OFFSET
_MARKER_IDS = [b + OFFSET for b in END_MARKER.encode()]


def _step(h: int, token_id: int) -> int:
    """FNV-1a over token ids: the rolling hash of a context."""
    return ((h ^ token_id) * 0x100000001B3) & _MASK


def _mix(x: int) -> int:
    """splitmix64 finaliser, so that nearby hashes pick unrelated words."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class FakeEngine:
    """Byte tokens, word-salad output that is a pure function of (context, seed)."""

    name = "fake"

    def __init__(
        self,
        model_id: str = "fake",
        *,
        model_path: str | None = None,
        threads: int | None = None,
        context_length: int | None = None,
        token_delay: float | None = None,
        chat_template: str | None = None,
        words: Sequence[str] | None = None,
    ) -> None:
        self.model_id = model_id
        self._context_length = context_length or 4096
        if token_delay is None:
            raw = os.environ.get(DELAY_ENV, "0") or "0"
            try:
                token_delay = float(raw)
            except ValueError as exc:
                raise EngineError(f"{DELAY_ENV}={raw!r} is not a number", engine="fake") from exc
        self.token_delay = max(0.0, token_delay)
        self._chat_template = chat_template
        words = list(words or WORDS)
        if not words or any(not w or " " in w or len(w.encode()) > 32 for w in words):
            raise EngineError("fake words must be 1-32 bytes without spaces", engine="fake")
        self._words = [[b + OFFSET for b in w.encode()] for w in words]
        self.recorder: Recorder | None = None
        self.steps: Any = None  # the current generation's sampler state (engines/steps.py)
        self._audit_salt = 0  # the salt of the commitment being audited (verifier mode)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Byte ids of `text`, BOS first when `add_bos`."""
        ids = [b + OFFSET for b in text.encode("utf-8")]
        return [BOS_ID, *ids] if add_bos else ids

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """The bytes of the ids; special ids render as nothing."""
        return bytes(i - OFFSET for i in ids if OFFSET <= i < VOCAB_SIZE)

    def is_end(self, token_id: int) -> bool:
        """Only EOS ends a generation."""
        return token_id == EOS_ID

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield the deterministic continuation of `prompt_ids` until the context is full."""
        if not prompt_ids:
            raise InvalidRequest("prompt is empty", param="prompt")
        if any(not 0 <= i < VOCAB_SIZE for i in prompt_ids):
            raise InvalidRequest("token id out of range", param="prompt")
        seed = params.seed
        if params.temperature > 0 and seed is None:
            seed = random.getrandbits(63)
        salt = _salt(seed, params.temperature)
        state = _State()
        for token_id in prompt_ids:
            state.push(token_id)
        n = len(prompt_ids)
        steps = None
        if wants_steps(params):
            from idlegrid.engines.steps import Steps

            steps = Steps(prompt_ids, params, VOCAB_SIZE)
        self.steps = steps
        while n < self._context_length:
            would = token_id = self._next(state, salt)
            if steps is not None:
                token_id = steps.pick(_choose, self._one_hot(would), seed or 0, n)
            if self.token_delay:
                time.sleep(self.token_delay)
            if self.recorder is not None:
                lp = steps.last if steps is not None else None
                self.recorder.add(token_id, _hidden(state.h, salt, would), lp)  # type: ignore[arg-type]
            yield token_id
            state.push(token_id)
            n += 1

    def score_prompt(self, ids: Sequence[int], on_logits: Any) -> None:
        """Each prompt position's logits (its greedy pick far above the rest), as llama.cpp's
        scoring pass gives them (engines/llamacpp.py); the last position is not scored."""
        state = _State()
        for p, token_id in enumerate(ids[:-1]):
            state.push(token_id)
            on_logits(p, self._one_hot(self._next(state, 0)))

    @staticmethod
    def _one_hot(token_id: int) -> np.ndarray:
        import numpy as np

        out = np.full(VOCAB_SIZE, _LOSER, dtype=np.float32)
        out[token_id] = 0.0
        return out

    def _next(self, state: _State, salt: int) -> int:
        word = self._words[_mix(state.h_boundary ^ salt) % len(self._words)]
        tail = state.tail
        if len(tail) < len(word) and word[: len(tail)] == tail:
            return word[len(tail)]
        if state.marker_words is not None and state.marker_words >= END_AFTER_WORDS:
            return EOS_ID
        return _SPACE

    @property
    def chat_template(self) -> str | None:
        """The template given to the constructor (None: render_chat's plain transcript)."""
        return self._chat_template

    @property
    def context_length(self) -> int:
        """Maximum tokens per sequence."""
        return self._context_length

    def describe(self) -> dict[str, Any]:
        """Engine facts; the fake is exact everywhere, so its class is just its version."""
        return {
            "engine": self.name,
            "version": "1",
            "model": self.model_id,
            "dtype": "bytes",
            "device": "cpu",
            "threads": 1,
            "context_length": self._context_length,
        }

    def close(self) -> None:
        """Nothing to free."""

    # ---- Auditable (engines/commit.py) ---------------------------------------------------

    def det_class(self) -> str:
        """engine/version/dtype/device/threads."""
        return "fake/1/bytes/cpu/t1"

    def prefill_states(self, ids: Sequence[int]) -> np.ndarray:
        """The state at every position of `ids`: what the fake would pick next there (under
        the salt of the commitment being audited), and the context's pseudo-random values."""
        import numpy as np

        state = _State()
        rows = []
        for token_id in ids:
            state.push(token_id)
            picked = self._next(state, self._audit_salt)
            rows.append(_hidden(state.h, self._audit_salt, picked))
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), HIDDEN)

    def logits_of(self, states: np.ndarray) -> np.ndarray:
        """Logits that put the token a state was picked for far above every other."""
        import numpy as np

        out = np.full((len(states), VOCAB_SIZE), _LOSER, dtype=np.float32)
        for r, row in enumerate(states):
            token_id = int(round(float(row[0]) * 256))
            if 0 <= token_id < VOCAB_SIZE:
                out[r, token_id] = 0.0
        return out

    def audit(
        self, context_ids: Sequence[int], c: Any, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> Any:
        """Recompute a commitment (verifier mode), the same way as every engine."""
        from idlegrid.engines.commit import recompute

        self._audit_salt = _salt(c.header.seed, c.header.temperature)
        return recompute(self, context_ids, c, max_new_tokens, stop, self._context_length)


def _choose(logits: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
    from idlegrid.core.trust import sampling

    return sampling.choose(logits, seed, position, params.temperature, params.top_p)


def _salt(seed: int | None, temperature: float) -> int:
    """What the seed adds to the context hash (nothing at temperature 0)."""
    if temperature <= 0 or seed is None:
        return 0
    return _mix(seed + 1)


def _hidden(h: int, salt: int, token_id: int) -> list[float]:
    """The fake hidden state that produced `token_id` after a context hashing to `h`: the
    token / 256, then values in [-1, 1) on a 2^-23 grid (exact in float32)."""
    values = [token_id / 256.0]
    for k in range(1, HIDDEN):
        x = _mix(h ^ salt ^ (k * 0x9E3779B97F4A7C15 & _MASK)) >> 40
        values.append(x / float(1 << 23) - 1.0)
    return values


class _State:
    """What `_next` needs from the context, updated in O(1) per token."""

    __slots__ = ("h", "h_boundary", "tail", "marker_words", "_recent")

    def __init__(self) -> None:
        self.h = 0xCBF29CE484222325
        self.h_boundary = self.h  # hash of the context up to and including the last space
        self.tail: list[int] = []  # ids after the last space (only the first 32 kept)
        self.marker_words: int | None = None  # spaces since the last END_MARKER
        self._recent: list[int] = []

    def push(self, token_id: int) -> None:
        self.h = _step(self.h, token_id)
        if token_id == _SPACE:
            self.h_boundary = self.h
            self.tail = []
            if self.marker_words is not None:
                self.marker_words += 1
        elif len(self.tail) < 32:
            self.tail.append(token_id)
        self._recent.append(token_id)
        if len(self._recent) > len(_MARKER_IDS):
            del self._recent[0]
        if self._recent == _MARKER_IDS:
            self.marker_words = 0
