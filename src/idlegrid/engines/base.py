"""The one interface every engine implements, and the text layer shared by all of them.

An engine turns token ids into token ids. Everything OpenAI-shaped that does not depend
on the engine (incremental UTF-8 decoding, stop strings, max_tokens, chat templates) lives
here once, so a plug-in engine (`--engine module:Class`) only has to implement `Engine`.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from idlegrid.core.grammar import GrammarSpec
    from idlegrid.core.trust.adjust import Adjust
    from idlegrid.core.trust.logprobs import TokenLogprobs


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling semantics: no repeat penalty, no top-k, no min-p; OpenAI's presence
    and frequency penalties and logit_bias (`adjust`), logprobs on request."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    adjust: Adjust | None = None  # penalties and logit_bias (None: none)
    logprobs: int | None = None  # alternatives reported per token (None: no logprobs)
    n_prior: int = 0  # trailing context tokens that are this choice's earlier output
    # Structured outputs: only engines whose describe() names a "grammar" engine get these.
    grammar: GrammarSpec | None = None
    grammar_prefix: tuple[int, ...] = ()  # answer tokens already generated (failover)


def wants_steps(params: SamplingParams) -> bool:
    """Whether these params need an engine that samples through `engines/steps.Steps`."""
    return params.logprobs is not None or (params.adjust is not None and not params.adjust.neutral)


@runtime_checkable
class Engine(Protocol):
    """A loaded model that can tokenize and generate. Not thread-safe: one request at a time."""

    name: str  # engine family, e.g. "llama.cpp", "torch"
    model_id: str  # grid model id, e.g. "gemma3:270m"

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with the model's BOS first when `add_bos`."""
        ...

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """UTF-8 bytes of the token ids (may end mid-character)."""
        ...

    def is_end(self, token_id: int) -> bool:
        """True for end-of-generation tokens (EOS, end-of-turn)."""
        ...

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield sampled token ids after `prompt_ids`, forever or until the caller stops."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template, if it ships one."""
        ...

    @property
    def context_length(self) -> int:
        """Maximum tokens (prompt + output) per sequence."""
        ...

    def describe(self) -> dict[str, Any]:
        """Engine facts for the determinism class: engine, version, dtype, threads."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...


@dataclass
class Piece:
    """One generated token and the text it completes (may be empty mid-character)."""

    token_id: int
    text: str
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass
class Generation:
    """Outcome of one generation: the pieces, and why it ended."""

    pieces: list[Piece] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


def stream_pieces(
    engine: Engine,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    prior_ids: Sequence[int] = (),
    result: Generation | None = None,
) -> Iterator[Piece]:
    """Generate up to `max_tokens` tokens as text pieces, honouring stop strings.

    `prior_ids` are tokens already generated for this request by an earlier attempt
    (failover): they extend the context and count against `max_tokens`, but are not
    yielded again. Text that could be the start of a stop string is held back until it
    cannot be; a matched stop string is never yielded. `result.finish_reason` is set to
    "stop" or "length" when the iterator ends.
    """
    result = result if result is not None else Generation()
    remaining = max_tokens - len(prior_ids)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if prior_ids:
        # Feed earlier output through the decoder (its text was sent already) so that a
        # character split across the failover boundary still comes out whole.
        decoder.decode(engine.detokenize(prior_ids))
    if remaining <= 0:
        result.finish_reason = "length"
        return
    held = ""  # text withheld because it may begin a stop string
    held_ids: list[int] = []
    count = 0
    context = [*prompt_ids, *prior_ids]
    steps = wants_steps(params)
    if steps:
        # An engine that cannot apply penalties, bias or logprobs must not drop them.
        if not hasattr(engine, "steps"):
            from idlegrid.errors import InvalidRequest

            raise InvalidRequest(
                f"engine {engine.name} cannot apply penalties, logit_bias or logprobs",
                param="logprobs" if params.logprobs is not None else "logit_bias",
            )
        params = replace(params, n_prior=len(prior_ids))  # penalties count earlier output
    if params.grammar is not None and prior_ids:
        params = replace(params, grammar_prefix=tuple(prior_ids))  # the grammar resumes there
    for token_id in engine.generate(context, params):
        if engine.is_end(token_id):
            break
        count += 1
        lp = engine.steps.last if steps else None  # type: ignore[attr-defined]
        text = held + decoder.decode(engine.detokenize([token_id]))
        held_ids.append(token_id)
        if stop:
            cut = _first_stop(text, stop)
            if cut is not None:
                result.finish_reason = "stop"
                piece = Piece(held_ids[-1], text[:cut], lp)
                result.pieces.append(piece)
                yield piece
                return
            keep = _stop_prefix_len(text, stop)
            if keep:
                held, text = text[-keep:], text[:-keep]
            else:
                held = ""
        # Tokens whose text is withheld are still reported, as empty pieces, so that token
        # counts (and failover) stay exact.
        for tid in held_ids[:-1]:
            piece = Piece(tid, "")
            result.pieces.append(piece)
            yield piece
        piece = Piece(held_ids[-1], text, lp)
        held_ids = []
        result.pieces.append(piece)
        yield piece
        if count >= remaining:
            break
    tail = held + decoder.decode(b"", final=True)
    if tail:
        piece = Piece(-1, tail)  # -1: text flushed at the end, not a new token
        result.pieces.append(piece)
        yield piece
    result.finish_reason = "length" if count >= remaining else "stop"


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for s in stop if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def generate_text(
    engine: Engine,
    prompt: str,
    *,
    max_tokens: int,
    params: SamplingParams | None = None,
    stop: Sequence[str] = (),
) -> Generation:
    """Generate a completion in-process: the reference the grid is compared against."""
    result = Generation()
    ids = engine.tokenize(prompt)
    for _ in stream_pieces(
        engine, ids, params or SamplingParams(), max_tokens=max_tokens, stop=stop, result=result
    ):
        pass
    return result


def check_prompt(ids: Sequence[int], context_length: int, vocab_size: int) -> None:
    """Refuse a prompt that is empty, overflows the context, or holds unknown token ids."""
    from idlegrid.errors import InvalidRequest

    if not ids:
        raise InvalidRequest("prompt is empty", param="prompt")
    if len(ids) >= context_length:
        raise InvalidRequest(
            f"prompt has {len(ids)} tokens; the context holds {context_length}", param="prompt"
        )
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise InvalidRequest("token id out of range", param="prompt")


def render_chat(engine: Engine, messages: Sequence[dict[str, Any]]) -> str:
    """Render chat messages to a prompt with the model's template (BOS left to tokenize)."""
    from idlegrid.engines.models import family_chat_template

    template = engine.chat_template or family_chat_template(engine.model_id)
    if not template:
        # No template shipped: a plain transcript that a base model continues sensibly.
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=list(messages), bos_token="", eos_token="", add_generation_prompt=True
    )
