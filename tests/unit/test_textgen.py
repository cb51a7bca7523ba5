"""The shared text layer (stream_pieces, generate_text, render_chat) over the fake engine."""

from __future__ import annotations

import jinja2
import pytest

from idlegrid.engines.base import (
    Generation,
    SamplingParams,
    generate_text,
    render_chat,
    stream_pieces,
)
from idlegrid.engines.fake import END_MARKER, FakeEngine

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The grid says:"

# Gemma 3's chat template as published with the instruction-tuned models.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine("fake:test", token_delay=0.0)


def reference(engine: FakeEngine, n: int = 60, prompt: str = PROMPT) -> tuple[str, list[int]]:
    """Text and token ids of an unstopped greedy run of `n` tokens."""
    gen = generate_text(engine, prompt, max_tokens=n, params=GREEDY)
    assert gen.finish_reason == "length"
    return gen.text, [p.token_id for p in gen.pieces if p.token_id >= 0]


def stream(engine: FakeEngine, **kwargs) -> tuple[list, Generation]:
    result = Generation()
    kwargs.setdefault("params", GREEDY)
    ids = engine.tokenize(kwargs.pop("prompt", PROMPT))
    params = kwargs.pop("params")
    pieces = list(stream_pieces(engine, ids, params, result=result, **kwargs))
    return pieces, result


def test_max_tokens_counts_every_token(engine: FakeEngine) -> None:
    text, ids = reference(engine, 25)
    assert len(ids) == 25
    assert text == engine.detokenize(ids).decode()
    assert text.startswith(" ") and len(text.split()) >= 3  # words, as documented


def test_stop_string_across_token_boundaries(engine: FakeEngine) -> None:
    text, _ = reference(engine)
    words = text.split(" ")
    stop = f"{words[2][1:]} {words[3][:2]}"  # ends one word, starts the next: 4+ byte tokens
    cut = text.index(stop)
    pieces, result = stream(engine, max_tokens=60, stop=[stop])
    out = "".join(p.text for p in pieces)
    assert out == text[:cut]
    assert result.finish_reason == "stop"
    assert stop not in out
    # Every token up to the match is accounted for, the matched ones included.
    assert sum(1 for p in pieces if p.token_id >= 0) == cut + len(stop)


def test_earliest_of_several_stops_wins(engine: FakeEngine) -> None:
    text, _ = reference(engine)
    words = text.split()
    late, early = words[4], words[1]
    gen = generate_text(engine, PROMPT, max_tokens=60, params=GREEDY, stop=[late, early, ""])
    assert gen.text == text[: text.index(early)]
    assert gen.finish_reason == "stop"


def test_possible_stop_prefix_is_held_back_then_released(engine: FakeEngine) -> None:
    text, _ = reference(engine)
    word = text.split()[1]
    start = text.index(" " + word) + 1  # where the second word begins
    stop = word + "#"  # never occurs: words are followed by a space
    pieces, result = stream(engine, max_tokens=60, stop=[stop])
    assert "".join(p.text for p in pieces) == text
    assert result.finish_reason == "length"
    emitted = ""
    for i, piece in enumerate(pieces[: start + len(word)]):
        emitted += piece.text
        if i >= start:
            # Inside the word the text so far could still become the stop string.
            assert piece.text == ""
            assert emitted == text[:start]
    assert pieces[start + len(word)].text == word + " "


def test_held_text_is_flushed_when_max_tokens_ends_the_run(engine: FakeEngine) -> None:
    text, _ = reference(engine, 30)
    tail = text[-3:]
    pieces, result = stream(engine, max_tokens=30, stop=[tail + "~"])
    assert "".join(p.text for p in pieces) == text
    assert pieces[-1].token_id == -1 and pieces[-1].text.endswith(tail)
    assert result.finish_reason == "length"


def test_end_token_finishes_with_stop(engine: FakeEngine) -> None:
    gen = generate_text(engine, f"note {END_MARKER} go", max_tokens=200, params=GREEDY)
    assert gen.finish_reason == "stop"
    assert 0 < len(gen.pieces) < 200
    assert len(gen.text.split()) == 3  # END_AFTER_WORDS spaces after the marker, one in the prompt


@pytest.mark.parametrize("split", [1, 7, 20, 39])
def test_continuation_from_prior_ids_equals_uninterrupted_run(
    engine: FakeEngine, split: int
) -> None:
    text, ids = reference(engine, 40)
    first = engine.detokenize(ids[:split]).decode()
    pieces, result = stream(engine, max_tokens=40, prior_ids=ids[:split])
    assert [p.token_id for p in pieces if p.token_id >= 0] == ids[split:]
    assert first + "".join(p.text for p in pieces) == text
    assert result.finish_reason == "length"


def test_prior_ids_at_max_tokens_yield_nothing(engine: FakeEngine) -> None:
    _, ids = reference(engine, 10)
    pieces, result = stream(engine, max_tokens=10, prior_ids=ids)
    assert pieces == []
    assert result.finish_reason == "length"


def test_multibyte_characters_split_across_tokens() -> None:
    engine = FakeEngine(words=["café", "日本語", "🤖", "naïve"])
    gen = generate_text(engine, PROMPT, max_tokens=80, params=GREEDY)
    assert "\ufffd" not in gen.text
    assert set(gen.text.split()[:-1]) <= {"café", "日本語", "🤖", "naïve"}  # the last may be cut
    assert any(len(c.encode()) >= 3 for c in gen.text)
    # A token that ends mid-character yields no text; the one that completes it yields it whole.
    assert any(p.text == "" for p in gen.pieces)
    assert "".join(p.text for p in gen.pieces) == engine.detokenize(
        [p.token_id for p in gen.pieces if p.token_id >= 0]
    ).decode(errors="replace")


def test_failover_inside_a_multibyte_character() -> None:
    engine = FakeEngine(words=["日本語", "🤖"])
    ids = engine.tokenize(PROMPT)
    full = generate_text(engine, PROMPT, max_tokens=40, params=GREEDY)
    all_ids = [p.token_id for p in full.pieces if p.token_id >= 0]
    # Cut after the first byte of the first multi-byte character: a killed attempt.
    split = next(i for i, t in enumerate(all_ids) if engine.detokenize([t])[0] >= 0xC0) + 1
    sent = ""
    for n, piece in enumerate(stream_pieces(engine, ids, GREEDY, max_tokens=40), start=1):
        sent += piece.text
        if n == split:
            break  # the provider died here; its partial character was never sent
    resumed = stream_pieces(engine, ids, GREEDY, max_tokens=40, prior_ids=all_ids[:split])
    rest = "".join(p.text for p in resumed)
    assert "\ufffd" not in sent + rest
    assert sent + rest == full.text


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine: FakeEngine) -> None:
    def sample(seed: int | None, temperature: float = 0.9) -> str:
        params = SamplingParams(temperature=temperature, seed=seed)
        return generate_text(engine, PROMPT, max_tokens=40, params=params).text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(5)}) >= 4
    assert sample(1, 0.0) == sample(2, 0.0) == reference(engine, 40)[0]


def test_render_chat_without_template_is_a_plain_transcript(engine: FakeEngine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(engine, messages) == "system: Be brief.\nuser: Hi\nassistant:"


def test_render_chat_with_gemma_template() -> None:
    engine = FakeEngine(chat_template=GEMMA_TEMPLATE)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    assert render_chat(engine, messages) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_render_chat_template_can_refuse_a_conversation() -> None:
    engine = FakeEngine(chat_template=GEMMA_TEMPLATE)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        render_chat(engine, bad)
