"""Chat messages with tools, as the role/content messages every chat template renders.

The gateway rewrites them once, so the provider and the verifier render the same prompt
from the work payload, whatever the engine's template supports. The format (documented in
docs/tools.md) is the output format, so the model sees earlier calls as it must write them:

- offered tools: a system preamble listing each function (name, description, parameters
  as compact JSON), how to call them, and what `tool_choice` asks for this turn; it joins
  the first system message, or opens the conversation;
- an assistant message's `tool_calls`: its content (if any), then
  `{"tool_calls":[{"name":...,"arguments":{...}}]}`;
- `role: "tool"` messages: a user turn `Result of <name> (<tool_call_id>): <content>`, the
  results of consecutive tool messages joined in one turn (templates that insist on
  alternating user/assistant turns accept that);
- `name` on another message: its content is prefixed with `<name>: `.

Any other message field with a value is refused (400 naming `messages[i].<field>`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from idlegrid.core.tools import ToolPlan
from idlegrid.errors import InvalidRequest

ROLES = {"developer": "system"}
# Fields OpenAI sends back on assistant messages that carry nothing when empty.
_EMPTY_OK = ("refusal", "audio", "function_call", "annotations")


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def preamble(plan: ToolPlan) -> str:
    """The system text that offers the tools."""
    lines = ["You can call these functions:"]
    for t in plan.tools:
        entry: dict[str, Any] = {"name": t.name}
        if t.description:
            entry["description"] = t.description
        entry["parameters"] = t.parameters
        lines.append(_compact(entry))
    lines.append(
        'To call functions, reply with only this JSON: {"tool_calls":[{"name":"<function '
        'name>","arguments":{<arguments>}}]}'
    )
    lines.append(
        {
            "none": "Do not call a function now: reply in text.",
            "auto": "Call functions if they help; otherwise reply in text.",
            "required": "Call one or more functions now.",
            "function": f"Call the function {plan.function} now.",
        }[plan.choice]
    )
    return "\n".join(lines)


def _call_text(i: int, calls: Any) -> tuple[str, dict[str, str]]:
    """An assistant's tool_calls in the output format, and their names by id."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or not calls:
        raise InvalidRequest("tool_calls must be a non-empty list", param=where)
    out, names = [], {}
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise InvalidRequest("only function tool calls are supported", param=f"{where}[{j}]")
        name, args = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("a tool call needs a name", param=f"{where}[{j}].function.name")
        try:
            parsed = json.loads(args) if isinstance(args, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidRequest(
                "arguments must be a JSON object in a string",
                param=f"{where}[{j}].function.arguments",
            )
        out.append({"name": name, "arguments": parsed})
        if isinstance(call.get("id"), str):
            names[call["id"]] = name
    return _compact({"tool_calls": out}), names


def _refuse_extras(i: int, msg: dict[str, Any], allowed: Sequence[str]) -> None:
    for key, value in msg.items():
        if key in ("role", "content", *allowed):
            continue
        if value is None or (key in _EMPTY_OK and not value):
            continue
        raise InvalidRequest(
            f"message field '{key}' is not supported on {msg['role']} messages",
            param=f"messages[{i}].{key}",
        )


def render_messages(
    messages: Sequence[dict[str, Any]], plan: ToolPlan | None
) -> list[dict[str, str]]:
    """Role/content messages for the chat template, tools and tool turns written out."""
    out: list[dict[str, str]] = []
    call_names: dict[str, str] = {}
    results: list[str] = []  # consecutive tool results, flushed as one user turn
    for i, msg in enumerate(messages):
        role, content = msg["role"], msg.get("content")
        text = "" if content is None else str(content)
        if role == "tool":
            _refuse_extras(i, msg, ("tool_call_id", "name"))
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in call_names:
                raise InvalidRequest(
                    "a tool message must answer a tool call of an earlier assistant message",
                    param=f"messages[{i}].tool_call_id",
                )
            results.append(f"Result of {call_names[call_id]} ({call_id}): {text}")
            continue
        if results:
            out.append({"role": "user", "content": "\n".join(results)})
            results = []
        if role == "assistant":
            _refuse_extras(i, msg, ("tool_calls", "name"))
            if msg.get("tool_calls") is not None:
                calls, names = _call_text(i, msg["tool_calls"])
                call_names.update(names)
                text = f"{text}\n{calls}" if text else calls
        else:
            _refuse_extras(i, msg, ("name",))
        name = msg.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise InvalidRequest("name must be a string", param=f"messages[{i}].name")
            text = f"{name}: {text}"
        out.append({"role": ROLES.get(role, role), "content": text})
    if results:
        out.append({"role": "user", "content": "\n".join(results)})
    if plan is not None:  # with no tools offered, earlier calls are only history
        _offer(out, preamble(plan))
    return out


def _offer(out: list[dict[str, str]], text: str) -> None:
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
