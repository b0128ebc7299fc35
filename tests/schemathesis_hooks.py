"""schemathesis hooks for tests/test_schemathesis.py's `st run` (loaded through SCHEMATHESIS_HOOKS; the server's
URL and key come in GPTMINI_ST_URL and GPTMINI_ST_KEY, its --parallel + --max-queue in GPTMINI_ST_CAPACITY).

Each narrows what is sent to what the OpenAPI document promises in words where JSON Schema has no words for it:

  * a request's prompt must fit the model's context: a text's length in tokens is no JSON Schema length, so a
    positive case whose prompt would not fit (counted by the server's own POST /tokenize) is not sent;
  * prompts × n must not pass --parallel + --max-queue (each is bounded in the schema, their product is not);
  * a named `tool_choice` must name one of `tools`: a positive case's is set to the first tool's name;
  * a JSON schema (`guided_json`, `response_format`'s, a tool's `parameters`) must be one llguidance compiles (it
    cannot read an integer past 64 bits, for one): a positive case holding one it refuses (asked of
    `gptmini.grammar`, as the server asks) is not sent;
  * `lookup` above 0 does not combine with a structure: a positive case asking for both gets `lookup` 0.

And one bounds the time the run takes: a valid `max_tokens` (`max_completion_tokens`, `max_output_tokens`) above
`CAP` is lowered to it. The schema rightly allows 32768, about 15 s of decoding per choice on this model; what the
server does with a larger number is what it does with 8, only longer.
"""

from __future__ import annotations

import os
from typing import Any

import requests
import schemathesis

CAP = 8
GENERATE = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
MAX_TOKENS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _positive(case: Any) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


def _tokens(payload: dict[str, Any]) -> tuple[int, int] | None:
    """(the prompt's tokens, the model's context) as POST /tokenize counts them; None when it cannot say."""
    r = requests.post(
        os.environ["GPTMINI_ST_URL"] + "/tokenize",
        json=payload,
        headers={"Authorization": f"Bearer {os.environ['GPTMINI_ST_KEY']}"},
        timeout=30,
    )
    if r.status_code != 200:
        return None
    out = r.json()
    return max(out["count"], 1), out["max_model_len"]  # an empty text prompt is <|endoftext|>


def _fits(payload: dict[str, Any]) -> bool:
    counted = _tokens(payload)
    return counted is None or counted[0] <= counted[1]


def _responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """/v1/responses' conversation as chat messages (what the server makes of it)."""
    instructions = body.get("instructions")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    given = body["input"]
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    for item in given:
        content = item.get("content")
        if isinstance(content, list):
            content = [{"type": "text", "text": part["text"]} for part in content]
        messages.append({"role": item["role"], "content": content})
    return messages


def _json_schemas(body: dict[str, Any]) -> list[Any]:
    """The JSON schemas a request asks its reply to follow."""
    schemas = [body.get("guided_json")]
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schemas.append(response_format["json_schema"].get("schema"))
    for tool in body.get("tools") or []:
        schemas.append(tool["function"].get("parameters"))
    return [s for s in schemas if isinstance(s, dict)]


def _compiles(schema: dict[str, Any]) -> bool:
    from gptmini import grammar
    from gptmini.errors import UserError

    try:
        grammar.json_schema(schema)
    except UserError:
        return False
    return True


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    body = case.body
    if case.operation.path not in GENERATE or not _positive(case) or not isinstance(body, dict):
        return True
    if not all(_compiles(s) for s in _json_schemas(body)):
        return False
    path = case.operation.path
    if path == "/v1/completions":
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompts = [prompt]
        elif all(isinstance(p, int) for p in prompt):
            prompts = []  # token ids: bounded by the schema
        else:
            prompts = [p for p in prompt if isinstance(p, str)]
        count = 1 if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt) else len(prompt)
        if count * body.get("n", 1) > int(os.environ["GPTMINI_ST_CAPACITY"]):
            return False
        return all(_fits({"prompt": p}) for p in prompts)
    if path == "/v1/chat/completions":
        return _fits({"messages": body["messages"]})
    return _fits({"messages": _responses_messages(body)})


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    body = case.body
    if case.operation.path not in GENERATE or not isinstance(body, dict):
        return case
    for name in MAX_TOKENS:
        value = body.get(name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and CAP < value <= 32768 and float(value).is_integer():  # (2000.0 is an integer too)
            body[name] = CAP
    choice, tools = body.get("tool_choice"), body.get("tools")
    if _positive(case) and isinstance(choice, dict) and tools:
        choice["function"]["name"] = tools[0]["function"]["name"]
    if _positive(case) and body.get("lookup") and _structured(body):
        body["lookup"] = 0  # the document: lookup above 0 does not combine with a structure
    return case


def _structured(body: dict[str, Any]) -> bool:
    """Whether a request asks for a structure (what makes its `lookup` a 400)."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") != "text":
        return True
    if any(body.get(name) is not None for name in ("guided_json", "guided_regex", "guided_choice")):
        return True
    return bool(body.get("tools")) and body.get("tool_choice") not in (None, "none")
