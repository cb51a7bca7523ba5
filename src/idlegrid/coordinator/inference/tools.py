"""Tool calling at the gateway: a chat request's tools and messages to the work payload, and
the constrained answer back to OpenAI's `tool_calls`, whole or as streamed deltas.

The provider streams raw tokens as always; the gateway reads the tool-call format
(core/tools.py) as it arrives. Streaming follows OpenAI: a call's first delta carries its
`index`, `id`, `type` and `function.name` with `arguments: ""`, later deltas carry argument
fragments as the model writes them, and the last chunk has `finish_reason: "tool_calls"`.
Text of an `auto` answer that is not a call goes out as content deltas, unchanged. Ids are
derived from the choice's task id, so an answer's ids are stable (and name its task).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from idlegrid.coordinator.inference.openai_schema import ChatRequest
from idlegrid.core import tools as t
from idlegrid.core.grammar import from_response_format
from idlegrid.core.tool_prompt import render_messages


@dataclass(frozen=True)
class ChatWork:
    """What a chat request puts in each choice's payload, and how its answers read back."""

    messages: list[dict[str, str]]
    grammar: dict[str, str] | None  # core/grammar.GrammarSpec.to_wire()
    calls: bool  # whether an answer may be tool calls


def prepare(body: ChatRequest) -> ChatWork:
    """Messages (tools and tool turns written out), the grammar, and whether calls may come."""
    plan = t.from_request(body.tools, body.tool_choice, body.parallel_tool_calls)
    messages = render_messages([m.model_dump() for m in body.messages], plan)
    text = from_response_format(body.response_format)
    spec = plan.grammar(text) if plan is not None else text
    if spec is None:
        return ChatWork(messages, None, False)
    from idlegrid.engines.grammar import check  # lazy: llguidance only where installed

    check(spec)
    return ChatWork(messages, spec.to_wire(), spec.kind == t.KIND)


def call_id(task_id: str, index: int) -> str:
    """The id of a choice's index-th tool call."""
    return "call_" + hashlib.sha256(f"{task_id}/{index}".encode()).hexdigest()[:24]


def whole_message(text: str, finish: str | None, task_id: str) -> tuple[dict[str, Any], Any]:
    """The assistant message and finish_reason of a complete answer that may hold calls."""
    calls = t.read_calls(text) if finish == "stop" else None
    if calls is None:  # text (auto), or cut short by max_tokens: returned as written
        return {"role": "assistant", "content": text}, finish
    tool_calls = [
        {
            "id": call_id(task_id, i),
            "type": "function",
            "function": {"name": name, "arguments": args},
        }
        for i, (name, args) in enumerate(calls)
    ]
    return {"role": "assistant", "content": None, "tool_calls": tool_calls}, "tool_calls"


class DeltaStream:
    """One choice's streamed output as chat deltas: content, or tool-call deltas."""

    def __init__(self, task_id: str) -> None:
        self._task_id = task_id
        self._reader = t.CallReader()
        self._broken = False  # output left the format: the rest goes out as content

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas for the next piece of output text."""
        if self._broken:
            return [{"content": text}]
        try:
            events = self._reader.feed(text)
        except ValueError:  # not produced by the grammar (cannot happen when constrained)
            self._broken = True
            return [{"content": text}]
        if self._reader.text is not None:
            # Decided: text. What was held while it might have opened a call goes out now.
            out, self._reader.text = self._reader.text, ""
            return [{"content": out}] if out else []
        return [{"tool_calls": [self._delta(e)]} for e in events]

    def _delta(self, e: t.Event) -> dict[str, Any]:
        if e.name:
            return {
                "index": e.index,
                "id": call_id(self._task_id, e.index),
                "type": "function",
                "function": {"name": e.name, "arguments": ""},
            }
        return {"index": e.index, "function": {"arguments": e.arguments}}

    def end(self, finish: str | None) -> tuple[list[dict[str, Any]], Any]:
        """Deltas still held when the answer ends, and its finish_reason."""
        if self._reader.done and finish == "stop" and not self._broken:
            return [], "tool_calls"
        held = self._reader.held()
        return ([{"content": held}] if held else []), finish
