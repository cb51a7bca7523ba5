"""Structured outputs, pure parts: response_format parsing, token masks in the seeded sampler,
the commitment's grammar field, and routing to engines that can constrain (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from idlegrid.coordinator.inference.structured import can_constrain, constrained, invalid_failure
from idlegrid.coordinator.views import NodeView
from idlegrid.core import grammar as g
from idlegrid.core.ledger import Price
from idlegrid.core.routing import Candidate
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import peek, sampling
from idlegrid.errors import InvalidRequest, NoCapacity


def bitmask_of(ok: np.ndarray) -> np.ndarray:
    """The grammar engine's layout: int32 words, bit t % 32 of word t // 32 = token t."""
    words = (len(ok) + 31) // 32
    bits = np.zeros(words * 32, dtype=np.uint8)
    bits[: len(ok)] = ok
    return np.packbits(bits, bitorder="little").view(np.int32)


def test_allowed_reads_the_engines_bit_layout() -> None:
    ok = np.zeros(70, dtype=bool)
    ok[[0, 5, 31, 32, 33, 69]] = True
    words = bitmask_of(ok)
    assert words.dtype == np.int32 and len(words) == 3
    assert words[0] == np.int32(np.uint32((1 << 0) | (1 << 5) | (1 << 31)).view(np.int32))
    assert np.array_equal(g.allowed(words, 70), ok)
    # Ids past the mask's end (a model vocabulary padded beyond the tokenizer's) are forbidden.
    assert not g.allowed(words, 100)[70:].any() and len(g.allowed(words, 100)) == 100


@pytest.mark.parametrize("vocab", [300, 8192, 262_144])  # exhaustive and pruned paths
def test_a_masked_token_is_never_drawn_and_the_draw_is_the_references(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
    ok = rng.random(vocab) < 0.01
    ok[int(np.argmax(logits))] = False  # the favourite is forbidden
    ok[7] = True
    z = g.apply_mask(logits, bitmask_of(ok))
    assert z.dtype == np.float32 and np.isneginf(z[~ok]).all() and (z[ok] == logits[ok]).all()
    for seed in range(12):
        for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (1.3, 0.9), (0.7, 0.5)):
            tok = sampling.choose(z, seed, 40 + seed, temperature, top_p)
            assert ok[tok]
            ref = sampling.choose_exhaustive(z, seed, 40 + seed, temperature, top_p)
            assert tok == ref  # pruning changes no answer under a mask either
            rep = sampling.replay(z, tok, seed, 40 + seed, temperature, top_p)
            assert rep.allowed and rep.margin >= 0


def test_top_p_is_taken_over_the_allowed_tokens_only() -> None:
    logits = np.array([10.0, 9.0, 1.0, 0.9, 0.8], dtype=np.float32)
    ok = np.array([False, False, True, True, True])
    z = g.apply_mask(logits, bitmask_of(ok))
    # Unmasked, top_p 0.5 would keep token 0 alone; masked, the nucleus is among 2, 3, 4.
    draws = {sampling.choose(z, s, 3, 1.0, 0.5) for s in range(60)}
    assert draws <= {2, 3} and 2 in draws
    assert sampling.choose(z, 0, 3, 0.0) == 2  # greedy: the best allowed token


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_replaying_a_forbidden_token_fails(temperature: float) -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(5000).astype(np.float32)
    ok = np.zeros(5000, dtype=bool)
    ok[[3, 4, 10]] = True
    z = g.apply_mask(logits, bitmask_of(ok))
    bad = int(np.argmax(logits)) if not ok[int(np.argmax(logits))] else 0
    rep = sampling.replay(z, bad, 5, 9, temperature, 1.0)
    assert not rep.margin >= -1e-3  # -inf (or NaN): never accepted
    rep_p = sampling.replay(z, bad, 5, 9, 1.0, 0.9)
    assert not rep_p.allowed or not rep_p.margin >= -1e-3


def test_response_format_kinds() -> None:
    assert g.from_response_format(None) is None
    assert g.from_response_format({"type": "text"}) is None
    obj = g.from_response_format({"type": "json_object"})
    assert obj is not None and obj.kind == "json_object" and obj.schema_obj() == {"type": "object"}
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    spec = g.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    )
    assert spec is not None and spec.kind == "json_schema" and spec.name == "x"
    # Canonical: compact, property order kept (it is the order the answer writes them in).
    assert (
        spec.schema
        == '{"type":"object","properties":{"b":{"type":"string"},"a":{"type":"integer"}}}'
    )
    again = g.GrammarSpec.from_wire(spec.to_wire())
    assert again == spec and again.digest() == spec.digest() and len(spec.digest()) == 32
    other = dict(schema, required=["a"])
    spec2 = g.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": other}}
    )
    assert spec2 is not None and spec2.digest() != spec.digest() != obj.digest()


@pytest.mark.parametrize(
    "rf",
    [
        "json",
        {"type": "yaml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
        {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
        },
        {
            "type": "json_schema",
            "json_schema": {
                "name": "x",
                "schema": {"properties": {"a": {"type": "array", "uniqueItems": True}}},
            },
        },
        {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"anyOf": [{"if": {}, "then": {}}]}},
        },
    ],
)
def test_bad_or_unsupported_response_formats_are_400s_naming_it(rf: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        g.from_response_format(rf)
    assert err.value.param == "response_format"


def test_a_property_named_like_a_keyword_is_fine() -> None:
    schema = {
        "type": "object",
        "properties": {"not": {"type": "string"}, "if": {"type": "boolean"}},
    }
    assert g.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )


def _commitment(constraint: cm.Constraint | None) -> cm.Commitment:
    entries = [(list(range(6)), [0.5, -0.25, 0.125, 1.0, 2.0, -3.0])]  # k_for(3 tokens) = 6
    return cm.build(
        "m", "e/1/f32/cpu/t1", [1, 2, 3], 9, 1.0, 1.0, [5, 6, 7], entries, "stop", True, 4,
        constraint=constraint,
    )  # fmt: skip


def test_the_grammar_is_committed_and_old_commitments_are_unchanged() -> None:
    plain = _commitment(None)
    con = cm.Constraint(bytes(range(32)), "llguidance/1.9.1")
    bound = _commitment(con)
    assert cm.decode(plain.encode()) == plain and plain.header.constraint is None
    assert not peek.peek_constrained(plain.encode()) and not peek.peek_constrained(b"\x01")
    back = cm.decode(bound.encode())
    assert back == bound and back.header.constraint == con
    assert peek.peek_constrained(bound.encode())
    # The draw matches verifiers on the grammar engine's version, read without decoding.
    assert peek.peek_grammar_engine(bound.encode()) == "llguidance/1.9.1"
    assert peek.peek_grammar_engine(plain.encode()) is None
    # The digest the beacon hashes covers the grammar; the unconstrained encoding is as before.
    assert plain.header.digest() != bound.header.digest()
    assert len(bound.header.encode()) == len(plain.header.encode()) + 32 + 2 + 16
    with pytest.raises(InvalidRequest):
        blob = bound.encode()
        cm.decode(blob[:-1])


def test_constraint_faults() -> None:
    h = _commitment(cm.Constraint(b"a" * 32, "llguidance/1")).header
    assert cm.constraint_faults(h, b"a" * 32) == []
    assert cm.constraint_faults(h, b"b" * 32)
    assert cm.constraint_faults(h, None)
    assert cm.constraint_faults(_commitment(None).header, b"a" * 32)
    assert cm.constraint_faults(_commitment(None).header, None) == []


def _node(node_id: str, facts: dict[str, object]) -> NodeView:
    return NodeView(node_id, node_id, b"", "live", 1, 1.0, 1.0, 0.0, {}, facts, {})


def test_only_engines_that_name_a_grammar_engine_are_routed_constrained_requests() -> None:
    nodes = {
        "a": _node("a", {"engine": "llama.cpp", "grammar": "llguidance/1.9.1"}),
        "b": _node("b", {"engine": "torch"}),
        "c": _node("c", {"engine": "llama.cpp", "grammar": None}),
    }
    cands = [Candidate(n, 0, 1, 0, 1.0) for n in nodes]
    prices = {n: Price(0, 0) for n in nodes}
    got, got_prices = constrained("m", nodes, cands, prices)
    assert [c.node_id for c in got] == ["a"] and set(got_prices) == {"a"}
    assert can_constrain(nodes["a"]) and not can_constrain(nodes["b"]) and not can_constrain(None)
    with pytest.raises(NoCapacity):
        constrained("m", {"b": nodes["b"]}, cands[1:2], {"b": prices["b"]})


def test_a_providers_refusal_of_the_schema_names_response_format() -> None:
    assert (
        invalid_failure("response_format: JSON schema not supported: x").param == "response_format"
    )
    assert invalid_failure("prompt is 9000 tokens").param == "prompt"
