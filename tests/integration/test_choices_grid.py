"""n > 1 and lists of prompts through the official openai client: one grid task per
choice, each seeded from the request, escrowed up front, settled and billed on its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from test_grid import MODEL, Grid, charge_for, expected, start_grid, stop_grid

from idlegrid.coordinator.inference.choices import choice_seed
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.fake import FakeEngine

PRICE = Price(10 * MICRO, 40 * MICRO)  # start_grid's price for its only provider


@pytest.fixture
def grid(tmp_path: Path, database_url: str) -> Iterator[Grid]:
    # One provider, so every choice is charged at one known price; a short context, so a
    # long prompt is refused by the provider itself.
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL, context_length=256)])
    yield g
    g.verify()
    stop_grid(g)


def _consumer_charge(grid: Grid, task_id: str) -> tuple[list[str], int]:
    """Memos of a task's entries and what its consumer paid for it."""
    mine = [e for e in grid.entries() if e["cause"]["id"] == task_id]  # type: ignore[index]
    consumer = ledger.consumer_account(grid.key_id)
    paid = -sum(
        p["amount"]
        for e in mine
        for p in e["postings"]  # type: ignore[attr-defined]
        if p["account"] == consumer
    )
    return [str(e["memo"]) for e in mine], paid


def test_n_choices_are_seeded_tasks_billed_each_and_summed(grid: Grid) -> None:
    consumer = ledger.consumer_account(grid.key_id)
    before = grid.balance(consumer)
    with grid.client() as client:
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt="Three ways", max_tokens=7, temperature=0.9, seed=5, n=3
        )
        resp = raw.parse()
        tasks = raw.headers["x-idlegrid-tasks"].split(",")
        assert len(set(tasks)) == 3 and resp.id == tasks[0]
        assert [c.index for c in resp.choices] == [0, 1, 2]
        texts = [c.text for c in resp.choices]
        assert texts == [
            expected("Three ways", 7, temperature=0.9, seed=choice_seed(5, j)) for j in range(3)
        ]
        assert len(set(texts)) == 3
        # Choice 0 is what n=1 with the same seed gives.
        one = client.completions.create(
            model=MODEL, prompt="Three ways", max_tokens=7, temperature=0.9, seed=5
        )
        assert one.choices[0].text == texts[0]

    prompt_tokens = len(FakeEngine(MODEL).tokenize("Three ways"))
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3 * prompt_tokens, 21)
    each = charge_for(prompt_tokens, 7, PRICE)
    for task_id in tasks:
        assert _consumer_charge(grid, task_id) == (["hold", "settle"], each)
    assert before - grid.balance(consumer) == 4 * each  # three choices and the n=1 request
    assert grid.balance(ledger.ESCROW) == 0


def test_a_list_of_prompts_gives_n_choices_each_indexed_prompt_times_n_plus_j(grid: Grid) -> None:
    prompts = ["alpha", "beta gamma"]
    with grid.client() as client:
        resp = client.completions.create(
            model=MODEL, prompt=prompts, max_tokens=5, temperature=0.7, seed=3, n=2
        )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for c in resp.choices:
        i, j = divmod(c.index, 2)
        assert c.text == expected(prompts[i], 5, temperature=0.7, seed=choice_seed(3, j))


def test_streamed_choices_interleave_with_their_index_and_sum_usage(grid: Grid) -> None:
    with grid.client() as client:
        whole = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            temperature=1.0,
            seed=8,
            n=3,
        )
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=6,
                temperature=1.0,
                seed=8,
                n=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = client.completions.create(
            model=MODEL, prompt=["a", "b"], max_tokens=4, temperature=0, stream=True
        )
        parts = {0: "", 1: ""}
        for chunk in text:
            for c in chunk.choices:
                parts[c.index] += c.text
    assert parts == {0: expected("a", 4, temperature=0.0), 1: expected("b", 4, temperature=0.0)}
    got: dict[int, str] = {0: "", 1: "", 2: ""}
    roles, finishes = [], []
    for chunk in chunks:
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.append(c.index)
            if c.finish_reason:
                finishes.append(c.index)
    assert sorted(roles) == sorted(finishes) == [0, 1, 2]
    assert got == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == 18 == whole.usage.completion_tokens


def test_the_escrow_covers_every_choice_up_front(tmp_path: Path, database_url: str) -> None:
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL)], credits=0)
    try:
        with g.client() as client:
            needed = {}
            for n in (1, 3):
                with pytest.raises(openai.APIStatusError) as exc:
                    client.completions.create(model=MODEL, prompt="hi", max_tokens=500, n=n)
                assert exc.value.status_code == 402
                needed[n] = exc.value.body["data"]["needed"]  # type: ignore[index]
            assert needed[3] == 3 * needed[1]
            with g.admin() as c:
                c.post(
                    "/api/v1/admin/mint",
                    json={"key_id": g.key_id, "amount": 2 * needed[1], "reference": "t"},
                ).raise_for_status()
            entries = len(g.entries())
            with pytest.raises(openai.APIStatusError) as exc:
                client.completions.create(model=MODEL, prompt="hi", max_tokens=500, n=3)
            assert exc.value.status_code == 402
            assert len(g.entries()) == entries  # refused before any choice was escrowed
            ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=500, n=2)
            assert len(ok.choices) == 2
        g.verify()
    finally:
        stop_grid(g)


def test_a_choice_the_provider_refuses_fails_the_request_and_is_not_charged(grid: Grid) -> None:
    consumer = ledger.consumer_account(grid.key_id)
    before = grid.balance(consumer)
    with grid.client() as client, pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(
            model=MODEL, prompt=["short", "x" * 400], max_tokens=4, temperature=0
        )
    assert exc.value.param == "prompt"
    assert grid.balance(ledger.ESCROW) == 0
    charged = before - grid.balance(consumer)
    # At most the short prompt's answer was billed; the refused one never is.
    assert 0 <= charged <= charge_for(len(FakeEngine(MODEL).tokenize("short")), 4, PRICE)


def test_models_retrieve_serves_ids_with_slashes_and_colons(
    tmp_path: Path, database_url: str
) -> None:
    g = start_grid(tmp_path, database_url, [FakeEngine(MODEL), FakeEngine("org/tiny:2b-q4")])
    try:
        with g.client() as client:
            listed = {m.id for m in client.models.list()}
            assert listed == {MODEL, "org/tiny:2b-q4"}
            for model_id in listed:
                m = client.models.retrieve(model_id)
                assert (m.id, m.object, m.owned_by) == (model_id, "model", "idlegrid")
            with pytest.raises(openai.NotFoundError) as exc:
                client.models.retrieve("org/nope:1b")
            assert exc.value.code == "model_not_found"
    finally:
        stop_grid(g)


def test_a_streamed_choice_that_fails_ends_the_stream_with_an_error(grid: Grid) -> None:
    body = {"model": MODEL, "prompt": ["short", "x" * 400], "max_tokens": 4, "stream": True}
    with grid.http() as c:
        r = c.post(
            "/v1/completions", json=body, headers={"Authorization": f"Bearer {grid.api_key}"}
        )
    lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "error" in lines[-2] and "context" in lines[-2]
    assert grid.balance(ledger.ESCROW) == 0
