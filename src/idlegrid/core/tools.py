"""Tool calling, the pure part: what `tools` / `tool_choice` / `parallel_tool_calls` ask for,
the grammar that enforces it, and reading the constrained answer back into tool calls.

The output format (what the model writes, and what the grammar allows) is one compact JSON
object, the same for every model:

    {"tool_calls":[{"name":"<function>","arguments":{...}}, ...]}

`name` is one of the offered functions (a JSON-schema `const`) and `arguments` validates
against that function's `parameters`. The grammar is a JSON schema for that object, wrapped
in a Lark grammar so that `tool_choice: "auto"` can also allow plain text:

- `required`: the object, one or more calls (exactly one without `parallel_tool_calls`);
- a named function: the object with exactly one call, to that function;
- `auto`: the object, or text that does not start with `{` (or, with a JSON
  `response_format`, the object or an answer matching that format: a JSON-schema `anyOf`);
- `none`: no tool grammar (the answer is text, or the response_format's JSON).

The spec's canonical text (hashed into the commitment) holds every offered function's name
and parameters, the choice, `parallel` and the text alternative, so the verifier replays
exactly the grammar the answer was sampled under.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from idlegrid.core.grammar import (
    FUNCTION_NAME,
    TOOLS_KIND,
    GrammarSpec,
    canonical,
    check_schema,
)
from idlegrid.errors import InvalidRequest

KIND = TOOLS_KIND
TOOLS, CHOICE, PARALLEL = "tools", "tool_choice", "parallel_tool_calls"
MAX_TOOLS = 128
ANY_PARAMETERS: dict[str, Any] = {"type": "object"}  # a function that declares none
CALLS_PREFIX = '{"tool_calls":['
# Compact JSON: no whitespace between tokens (as response_format), strict about extra keys.
_X_GUIDANCE = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Tool:
    """One offered function: its name, description (prompt only) and parameters schema."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tool fields ask for."""

    tools: tuple[Tool, ...]
    choice: str  # "auto" | "none" | "required" | "function"
    function: str = ""  # the named function when choice == "function"
    parallel: bool = True

    def grammar(self, text: GrammarSpec | None = None) -> GrammarSpec | None:
        """The grammar of the answer; `text` is response_format's (None: free text)."""
        if self.choice == "none":
            return text
        doc = {
            "choice": self.function if self.choice == "function" else self.choice,
            "parallel": self.parallel,
            "tools": [{"name": t.name, "parameters": t.parameters} for t in self.tools],
            "text": None if text is None else text.schema_obj(),
        }
        return GrammarSpec(KIND, canonical(doc))


def _choice(value: Any, names: list[str]) -> tuple[str, str]:
    if value is None:
        return ("auto" if names else "none"), ""
    if value in ("auto", "none", "required"):
        return str(value), ""
    if isinstance(value, dict) and value.get("type") == "function":
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in names:
            raise InvalidRequest(
                f"tool_choice names function {name!r}, which is not in tools", param=CHOICE
            )
        return "function", name
    raise InvalidRequest(
        "tool_choice must be 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
        param=CHOICE,
    )


def _tool(i: int, raw: Any) -> Tool:
    where = f"{TOOLS}[{i}]"
    if not isinstance(raw, dict) or raw.get("type") != "function":
        raise InvalidRequest("only function tools are supported", param=f"{where}.type")
    fn = raw.get("function")
    if not isinstance(fn, dict):
        raise InvalidRequest("a function tool needs a function object", param=f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise InvalidRequest(
            "function names are 1-64 characters of a-z, A-Z, 0-9, _ and -",
            param=f"{where}.function.name",
        )
    desc = fn.get("description") or ""
    if not isinstance(desc, str):
        raise InvalidRequest("description must be a string", param=f"{where}.function.description")
    params = fn.get("parameters")
    params = ANY_PARAMETERS if params is None or params == {} else params
    if isinstance(params, dict) and "type" not in params:
        params = {"type": "object", **params}  # arguments are always an object (OpenAI)
    if not isinstance(params, dict) or params["type"] != "object":
        raise InvalidRequest(
            "parameters must be a JSON schema of type object", param=f"{where}.function.parameters"
        )
    try:
        # `strict` false is enforced as strictly as true (as response_format).
        params = check_schema(params)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param=f"{where}.function.parameters") from exc
    return Tool(name, desc, params)


def from_request(tools: Any, tool_choice: Any, parallel: Any) -> ToolPlan | None:
    """The plan a request's `tools`, `tool_choice` and `parallel_tool_calls` ask for (None:
    no tools offered)."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", param=CHOICE)
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools must be a list of at most {MAX_TOOLS}", param=TOOLS)
    parsed = tuple(_tool(i, t) for i, t in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise InvalidRequest("function names must be unique", param=TOOLS)
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be a boolean", param=PARALLEL)
    choice, function = _choice(tool_choice, names)
    return ToolPlan(parsed, choice, function, True if parallel is None else parallel)


# ---- the grammar -----------------------------------------------------------------------


def calls_schema(doc: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of the tool-call object for a canonical tools document."""
    choice = doc["choice"]
    tools = [t for t in doc["tools"] if choice in ("auto", "required") or t["name"] == choice]
    one = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    array: dict[str, Any] = {"type": "array", "items": one[0] if len(one) == 1 else {"anyOf": one}}
    array["minItems"] = 1
    if not doc["parallel"] or choice not in ("auto", "required"):
        array["maxItems"] = 1  # a named function is called exactly once
    return {
        "type": "object",
        "properties": {"tool_calls": array},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }


def lark(spec: GrammarSpec) -> str:
    """The llguidance Lark grammar of a tools spec."""
    doc = spec.schema_obj()
    calls = calls_schema(doc)
    text = doc.get("text")
    if doc["choice"] != "auto":
        body = {**calls, "x-guidance": _X_GUIDANCE}
        return f"%llguidance {{}}\nstart: %json {canonical(body)}\n"
    if text is not None:  # auto with a JSON response_format: the calls or that answer
        both = {"anyOf": [calls, text], "x-guidance": _X_GUIDANCE}
        return f"%llguidance {{}}\nstart: %json {canonical(both)}\n"
    # auto: the calls, or text that does not open with `{` (which would be ambiguous).
    body = {**calls, "x-guidance": _X_GUIDANCE}
    return (
        "%llguidance {}\nstart: calls | TEXT\n"
        f"calls: %json {canonical(body)}\n"
        "TEXT: /[^{](.|\\n)*/\n"
    )


# ---- reading the answer ----------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """What a piece of output adds: a call opened (`name`) or argument text (`arguments`)."""

    index: int
    name: str = ""
    arguments: str = ""


class CallReader:
    """Reads the tool-call format as it streams, yielding call starts and argument
    fragments; `text` is set instead when the answer is plain text (`auto`).

    The grammar writes `name` before `arguments` and no whitespace, so one pass with a small
    state machine suffices; anything else raises ValueError (the answer is then text)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (name, arguments JSON text)
        self.text: str | None = None  # plain-text answer, once decided
        self.done = False
        self._seen = ""  # output so far, while it may still open the call object
        self._state = "lit"
        self._lit, self._next = CALLS_PREFIX, "call"
        self._name = ""
        self._depth, self._in_str, self._esc = 0, False, False

    def feed(self, text: str) -> list[Event]:
        """Consume output text; the events it completes."""
        if self.text is not None:
            self.text += text
            return []
        if not self.calls and self._state == "lit" and self._next == "call":
            self._seen += text
            if not CALLS_PREFIX.startswith(self._seen[: len(CALLS_PREFIX)]):
                self.text, self._seen = self._seen, ""
                return []
            if len(self._seen) < len(CALLS_PREFIX):
                return []
            text, self._seen, self._lit = self._seen[len(CALLS_PREFIX) :], "", ""
            self._state = "call"
        out: list[Event] = []
        for ch in text:
            self._step(ch, out)
        return _merge(out)

    def held(self) -> str:
        """Output held back while it could still open the call object (then: text)."""
        out, self._seen = self._seen, ""
        return out

    def _expect(self, literal: str, then: str) -> None:
        self._state, self._lit, self._next = "lit", literal, then

    def _step(self, ch: str, out: list[Event]) -> None:
        if self._state == "lit":
            if not self._lit or ch != self._lit[0]:
                raise ValueError(f"unexpected {ch!r} in a tool call")
            self._lit = self._lit[1:]
            if not self._lit:
                self._state = self._next
                self.done = self._state == "end"
            return
        if self._state == "call":
            self._expect('"name":"', "name")
            if ch != "{":
                raise ValueError(f"unexpected {ch!r} opening a tool call")
        elif self._state == "name":
            if ch != '"':
                self._name += ch
                return
            out.append(Event(len(self.calls), name=self._name))
            self.calls.append((self._name, ""))
            self._name = ""
            self._expect(',"arguments":', "args")
        elif self._state == "args":
            self._args(ch, out)
        elif self._state == "sep":
            if ch == ",":
                self._state = "call"
            elif ch == "]":
                self._expect("}", "end")
            else:
                raise ValueError(f"unexpected {ch!r} after a tool call")
        elif self._state == "end":
            raise ValueError("text after the tool calls")

    def _args(self, ch: str, out: list[Event]) -> None:
        k = len(self.calls) - 1
        name, sofar = self.calls[k]
        self.calls[k] = (name, sofar + ch)
        out.append(Event(k, arguments=ch))
        if self._in_str:
            self._esc, self._in_str = (False, True) if self._esc else (ch == "\\", ch != '"')
            return
        if ch == '"':
            self._in_str = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
        if self._depth == 0:
            self._expect("}", "sep")


def _merge(events: list[Event]) -> list[Event]:
    """Adjacent argument characters of one call as one fragment."""
    out: list[Event] = []
    for e in events:
        if out and not e.name and not out[-1].name and out[-1].index == e.index:
            out[-1] = Event(e.index, arguments=out[-1].arguments + e.arguments)
        else:
            out.append(e)
    return out


def read_calls(text: str) -> list[tuple[str, str]] | None:
    """The complete tool calls in an answer, as (name, arguments JSON); None if the answer is
    text or was cut short (finish_reason "length")."""
    reader = CallReader()
    try:
        reader.feed(text)
    except ValueError:
        return None
    return reader.calls if reader.done else None
