"""Structured outputs, the pure part: what a `response_format` asks for, its canonical form and
hash (what a provider commits to), and applying a grammar engine's token mask to logits.

The grammar engine itself (llguidance) lives in `engines/grammar.py`; it hands back a
bitmask per step (32 tokens per uint32 word, bit t % 32 of word t // 32 set = allowed), and
the sampler sees the masked logits: a forbidden token gets −inf before temperature and
top-p, so it can never be drawn and the nucleus is computed over allowed tokens only. The
verifier applies the same masks to its own logits, so a committed token outside the grammar
has margin −inf and fails the audit.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from idlegrid.errors import InvalidRequest

PARAM = "response_format"
MAX_SCHEMA_BYTES = 64 << 10
MAX_DEPTH = 32
# JSON Schema keywords the grammar engine cannot enforce (llguidance 1.9 says "Unimplemented
# keys" for these). Refused up front rather than served unconstrained; the provider's compile
# is the final word for anything else (it fails the request with a 400 naming the param).
UNSUPPORTED = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedProperties",
        "unevaluatedItems",
        "$dynamicRef",
        "$recursiveRef",
    }
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "propertyNames")
# `{"type": "json_object"}`: any JSON object (OpenAI's JSON mode).
ANY_OBJECT = {"type": "object"}
# Tool calling (core/tools.py): the spec's text is a canonical tools document.
TOOLS_KIND = "tools"
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the answer: its kind and canonical JSON Schema text."""

    kind: str  # "json_object", "json_schema" or "tools"
    schema: str  # canonical JSON (compact, keys in the order given); tools: the document
    name: str = ""  # json_schema's name: echoed, not enforced (and not hashed)

    def digest(self) -> bytes:
        """SHA-256 of the canonical grammar: what the commitment binds the answer to."""
        return hashlib.sha256(f"idlegrid-grammar\0{self.kind}\0{self.schema}".encode()).digest()

    @property
    def param(self) -> str:
        """The request field a refusal of this grammar names."""
        return "tools" if self.kind == TOOLS_KIND else PARAM

    def schema_obj(self) -> dict[str, Any]:
        """The schema as a dict."""
        out: dict[str, Any] = json.loads(self.schema)
        return out

    def to_wire(self) -> dict[str, str]:
        """Work-payload form."""
        return {"kind": self.kind, "schema": self.schema, "name": self.name}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> GrammarSpec:
        """Parse the payload form (re-canonicalised: the provider hashes what it compiles)."""
        kind = d.get("kind")
        if kind not in ("json_object", "json_schema", TOOLS_KIND):
            raise InvalidRequest(f"unknown grammar kind {kind!r}", param=PARAM)
        try:
            schema = json.loads(str(d.get("schema", "")))
        except ValueError as exc:
            raise InvalidRequest(f"grammar schema is not JSON: {exc}", param=PARAM) from exc
        if kind == TOOLS_KIND:
            return cls(TOOLS_KIND, canonical(_check_tools(schema)))
        return cls(str(kind), canonical(_check_schema(schema)), str(d.get("name") or ""))


def canonical(schema: dict[str, Any]) -> str:
    """The one text of a schema that both sides hash: compact, keys in the order given
    (not sorted: the order of `properties` is the order the answer writes them in)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def from_response_format(rf: Any) -> GrammarSpec | None:
    """The constraint a request's `response_format` asks for (None: plain text)."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise InvalidRequest("response_format must be an object", param=PARAM)
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", canonical(ANY_OBJECT))
    if kind != "json_schema":
        raise InvalidRequest(
            f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
            param=PARAM,
        )
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str) or not js["name"]:
        raise InvalidRequest("response_format.json_schema needs a name", param=PARAM)
    schema = js.get("schema", {})  # OpenAI: an absent schema is any JSON
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema must be an object", param=PARAM)
    # `strict` false is honoured more strictly than asked: the schema is always enforced.
    return GrammarSpec("json_schema", canonical(_check_schema(schema)), js["name"][:64])


def _check_tools(doc: Any) -> dict[str, Any]:
    """Validate a tools document (core/tools.ToolPlan.grammar) from the wire."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tools"), list) or not doc["tools"]:
        raise InvalidRequest("a tools grammar needs a list of tools", param="tools")
    names = []
    for t in doc["tools"]:
        if not isinstance(t, dict) or not FUNCTION_NAME.match(str(t.get("name", ""))):
            raise InvalidRequest("a tool in the grammar has no valid name", param="tools")
        _check_schema(t.get("parameters"))
        names.append(t["name"])
    if doc.get("choice") not in ("auto", "required", *names):
        raise InvalidRequest(f"unknown tool choice {doc.get('choice')!r}", param="tool_choice")
    if not isinstance(doc.get("parallel"), bool):
        raise InvalidRequest("parallel must be a boolean", param="parallel_tool_calls")
    if doc.get("text") is not None:
        _check_schema(doc["text"])
    return doc


def check_schema(schema: Any) -> dict[str, Any]:
    """A JSON schema the grammar engine can enforce, else a 400 (naming response_format)."""
    return _check_schema(schema)


def _check_schema(schema: Any) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise InvalidRequest("the JSON schema must be an object", param=PARAM)
    if len(canonical(schema).encode()) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"the JSON schema is over {MAX_SCHEMA_BYTES} bytes", param=PARAM)
    _walk(schema, 0)
    return schema


def _walk(node: Any, depth: int) -> None:
    """Refuse schema keywords the grammar engine cannot enforce, anywhere in the schema."""
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"the JSON schema nests deeper than {MAX_DEPTH}", param=PARAM)
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise InvalidRequest("a JSON subschema must be an object or a boolean", param=PARAM)
    bad = sorted(UNSUPPORTED & node.keys())
    if bad:
        raise InvalidRequest(
            f"JSON schema keyword {bad[0]!r} is not supported by structured outputs", param=PARAM
        )
    for key in _SCHEMA_MAPS:
        sub = node.get(key)
        if isinstance(sub, dict):
            for v in sub.values():
                _walk(v, depth + 1)
    for key in _SCHEMA_LISTS:
        sub = node.get(key)
        if isinstance(sub, list):
            for v in sub:
                _walk(v, depth + 1)
    for key in _SCHEMA_ONE:
        if key in node and not isinstance(node[key], list):
            _walk(node[key], depth + 1)


# ---- masks ---------------------------------------------------------------------------


def allowed(bitmask: np.ndarray, n_vocab: int) -> np.ndarray:
    """Boolean per token id from a little-endian uint32/int32 bitmask (bit set = allowed)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), bitorder="little")
    out: np.ndarray = bits[:n_vocab].astype(bool)
    if len(out) < n_vocab:  # ids past the mask's end are not in the grammar's vocabulary
        out = np.concatenate([out, np.zeros(n_vocab - len(out), dtype=bool)])
    return out


def masked(logits: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """A copy of `logits` with every token not `ok` at −inf (dtype kept)."""
    out: np.ndarray = np.where(ok, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)
    return out


def apply_mask(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """A copy of `logits` with every token the bitmask forbids at −inf (dtype kept)."""
    return masked(logits, allowed(bitmask, len(logits)))
