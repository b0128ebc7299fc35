"""Structured output over HTTP: `response_format`, `tools` / `tool_choice`, and vLLM's `guided_*` extensions, read
into one grammar (`gptmini.grammar`) that the engine decodes under.

  * `response_format`: `{"type": "text"}` (nothing), `{"type": "json_object"}` (any JSON object),
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (JSON valid under the schema);
  * `tools` with `tool_choice` `"required"` or `{"type": "function", "function": {"name": …}}`: the reply is a call,
    answered in OpenAI's `tool_calls` shape with `finish_reason: "tool_calls"`. A named function (or the only tool
    under `"required"`) decodes its `arguments` under its `parameters` schema and streams them as they come;
    several tools under `"required"` decode `{"name": …, "arguments": {…}}` under the union of their schemas and
    send the call when it is complete. `"none"` leaves the tools out. `"auto"` (the default when tools are sent)
    is a 400: a model without a tool-call format cannot be left to choose between text and a call;
  * `guided_json`, `guided_regex`, `guided_choice` (vLLM's names) on both endpoints.

At most one of them per request. A history holding earlier calls (an assistant message with `tool_calls`, a `tool`
message with the result) is written into the chat template as text, so an agent's loop can go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gptmini import grammar
from gptmini.server_state import APIError


@dataclass
class Structure:
    """What a request's reply must be: its grammar, and whether (and how) the reply is a function call."""

    grammar: str | None = None
    function: str | None = None  # the reply is this function's arguments
    functions: list[str] = field(default_factory=list)  # the reply is {"name", "arguments"} of one of these

    @property
    def is_call(self) -> bool:
        return self.function is not None or bool(self.functions)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _response_format(value: Any) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad("response_format", 'must be an object with a "type"')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar.json_schema(None)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
            raise _bad("response_format", 'json_schema must be {"name": ..., "schema": {...}}')
        return grammar.json_schema(spec.get("schema", {}))
    raise _bad("response_format", f'unknown type {kind!r}: use "text", "json_object" or "json_schema"')


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    """`tools` as {name: parameters schema}."""
    if not isinstance(tools, list):
        raise _bad("tools", "must be a list of tools")
    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad("tools", f'tool {i + 1} must be {{"type": "function", "function": {{"name": ...}}}}')
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise _bad("tools", f"tool {i + 1}: parameters must be a JSON schema object")
        out[fn["name"]] = params
    return out


def _tool_structure(tools: Any, choice: Any) -> Structure:
    functions = _functions(tools) if tools is not None else {}
    if choice is None:
        choice = "auto" if functions else "none"
    if choice == "none":
        return Structure()
    if not functions:
        raise _bad("tool_choice", "names a tool call but no tools were sent")
    if choice == "auto":
        raise APIError(
            400,
            'tool_choice: "auto" is not supported (this server cannot leave a model to choose between text and a '
            'call): send "required", a named function {"type": "function", "function": {"name": ...}}, or "none"',
            param="tool_choice",
            code="unsupported_value",
        )
    if choice == "required" and len(functions) > 1:
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, params in functions.items()
        ]
        return Structure(grammar.json_schema({"anyOf": calls}), functions=list(functions))
    if choice == "required":
        name = next(iter(functions))
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
    ):
        name = choice["function"].get("name")
        if name not in functions:
            raise _bad("tool_choice", f"names the function {name!r}, which is not among the tools")
    else:
        raise _bad(
            "tool_choice", 'must be "none", "required" or {"type": "function", "function": {"name": ...}}'
        )
    return Structure(grammar.json_schema(functions[name]), function=name)


def structure(body: Any, tokenizer: Any, vocab_size: int, *, chat: bool) -> Structure:
    """The request's structure (a 400 naming the field for anything unusable)."""
    asked = {
        name: getattr(body, name, None)
        for name in ("response_format", "guided_json", "guided_regex", "guided_choice")
        if getattr(body, name, None) is not None
    }
    if isinstance(asked.get("response_format"), dict) and asked["response_format"].get("type") == "text":
        del asked["response_format"]  # plain text asks for nothing
    tools = getattr(body, "tools", None) if chat else None
    calls = Structure()
    if chat:
        calls = _tool_structure(tools, getattr(body, "tool_choice", None))
    if len(asked) + calls.is_call > 1:
        named = [*asked, *(["tools"] if calls.is_call else [])]
        raise APIError(400, f"{', '.join(named)}: ask for one structure at a time", param=named[-1])
    try:
        if calls.is_call:
            out = calls
        elif "response_format" in asked:
            out = Structure(_response_format(asked["response_format"]))
        elif "guided_json" in asked:
            value = asked["guided_json"]
            out = Structure(grammar.json_schema(json.loads(value) if isinstance(value, str) else value))
        elif "guided_regex" in asked:
            if not isinstance(asked["guided_regex"], str):
                raise _bad("guided_regex", "must be a string")
            out = Structure(grammar.regex(asked["guided_regex"]))
        elif "guided_choice" in asked:
            if not isinstance(asked["guided_choice"], list):
                raise _bad("guided_choice", "must be a list of strings")
            out = Structure(grammar.one_of(asked["guided_choice"]))
        else:
            return Structure()
        if out.grammar is not None:
            grammar.check(out.grammar, tokenizer, vocab_size)
    except ValueError as e:  # UserError is one
        param = next(iter(asked), "tools")
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None
    return out


def tool_call(s: Structure, text: str, ident: str) -> dict[str, Any] | None:
    """The reply `text` as one OpenAI tool call, or None where it is no whole call (cut by max_tokens)."""
    if s.function is not None:
        name, arguments = s.function, text
    else:
        try:
            call = json.loads(text)
        except ValueError:
            return None
        name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}


def call_delta(s: Structure, state: Any, text: str, finished: bool) -> dict[str, Any]:
    """A stream's delta for a reply that is a call (`state`: the choice's, with `call_id`, `call_started` and the
    text so far): a named function's arguments as they come, the first delta with its id and name; a call of one
    of several functions whole, at the end (its name is known only then)."""
    if s.function is not None:
        if not text:
            return {}
        entry: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
        if not state.call_started:
            state.call_started = True
            entry = {
                "index": 0,
                "id": state.call_id,
                "type": "function",
                "function": {"name": s.function, "arguments": text},
            }
        return {"tool_calls": [entry]}
    if not finished:
        return {}
    call = tool_call(s, "".join(state.text), state.call_id)
    return {"tool_calls": [{"index": 0, **call}]} if call else {"content": "".join(state.text)}


def history_message(m: dict[str, Any]) -> dict[str, Any]:
    """An earlier call or its result, as a plain message the chat template can write: an assistant message with
    `tool_calls` says the calls as JSON; a `tool` message is the user's turn holding the result.

    `content` is text here (the server joins text parts first); any other content is left for the caller to refuse.
    """
    content = m.get("content")
    if m.get("role") == "tool" and isinstance(content, str):
        return {"role": "user", "content": f"Result of call {m.get('tool_call_id', '')}: {content}"}
    calls = m.get("tool_calls")
    if m.get("role") == "assistant" and isinstance(calls, list) and calls and isinstance(content, str | None):
        said = []
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            fn = fn if isinstance(fn, dict) else {}
            said.append(f'{{"name": {json.dumps(fn.get("name"))}, "arguments": {fn.get("arguments", "{}")}}}')
        text = m.get("content") or ""
        return {"role": "assistant", "content": (text + "\n" if text else "") + "\n".join(said)}
    return m
