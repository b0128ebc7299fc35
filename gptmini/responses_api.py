"""`POST /v1/responses`: OpenAI's newer API (what its SDK and agent tools default to), over the same engine.

Text in, text out: `input` is a string or a list of messages (`{"role", "content"}`, content a string or
`input_text` / `output_text` parts), `instructions` a system message before them; the conversation is rendered by
the model's chat template, as `/v1/chat/completions` does. The reply is one `message` output item with one
`output_text` part; `status` is `incomplete` (`incomplete_details.reason: max_output_tokens`) when the text was
cut. `stream: true` sends OpenAI's events in order: `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`…,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`, `response.completed`.

Nothing is stored: `previous_response_id`, `background` and tools are refused with a 400 naming them, as is any
field this server does not implement (metadata such as `store`, `metadata`, `user` passes).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gptmini.errors import UserError
from gptmini.openai_api import (
    MAX_TOKENS,
    _chat_messages,
    _check_context,
    _Choice,
    _ChoiceState,
    _event_stream,
    _gather,
    _submit,
    _take,
    whole_numbers,
)
from gptmini.server_state import APIError, State, _require_ready

# Fields that ask for nothing when absent or at these values; any other value is a 400 naming the field.
HARMLESS: dict[str, tuple[Any, ...]] = {
    "store": (None, True, False),  # nothing is stored either way
    "truncation": (None, "disabled"),
    "parallel_tool_calls": (None, True, False),
    "tools": (None, []),
    "tool_choice": (None, "auto", "none"),
    "include": (None, []),
    "reasoning": (None,),
    "previous_response_id": (None,),
    "background": (None, False),
    "prompt": (None,),
    "text": (None, {"format": {"type": "text"}}),
}
METADATA = ("metadata", "user", "service_tier", "safety_identifier", "prompt_cache_key", "stream_options")


class ResponsesBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    _whole = field_validator("max_output_tokens", mode="before")(whole_numbers)
    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values (1 is not true; `==` says it is)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _refuse(body: ResponsesBody) -> None:
    for name, value in (body.model_extra or {}).items():
        harmless = name in METADATA or any(_same(value, ok) for ok in HARMLESS.get(name, ()))
        if not harmless:
            raise APIError(
                400, f"{name}: not supported by this server", param=name, code="unsupported_parameter"
            )


def _messages(body: ResponsesBody) -> list[dict[str, str]]:
    """The conversation as chat messages: instructions first, then the input."""
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    for item in items:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise APIError(400, "input: only messages (role and text content) are supported", param="input")
        content = item.get("content")
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict)]
            texts = [p.get("text") for p in parts]
            kinds = all(p.get("type") in ("input_text", "output_text") for p in parts)
            strings = all(isinstance(t, str) for t in texts)
            if len(texts) != len(content) or not strings or not kinds:
                raise APIError(
                    400, "input: only input_text and output_text parts are supported", param="input"
                )
            content = "".join(texts)
        messages.append({"role": item.get("role"), "content": content})
    try:
        return _chat_messages(messages)
    except APIError as e:
        raise APIError(400, e.message.replace("messages", "input", 1), param="input") from None


def _choice(state: State, body: ResponsesBody) -> _Choice:
    from gptmini.api import sampling_config
    from gptmini.rows import Request

    template = state.template
    ids = template.encode(state.lm.tokenizer, _messages(body))
    _check_context(state, ids, "input")
    block = state.lm.config.block_size
    try:
        sampling = sampling_config(
            temperature=body.temperature,
            top_k=None,
            top_p=body.top_p if body.top_p < 1.0 else None,
            stop=list(template.stop),
        )
    except UserError as e:
        raise APIError(400, str(e)) from None
    request = Request(
        prompt_ids=ids,
        sampling=sampling,
        max_new_tokens=body.max_output_tokens or max(block - len(ids), 1),
        strip_leading_space=template.name == "plain",
        lookup=state.settings.lookup,
    )
    return _Choice(request, 0)


class _Reply:
    """The response object as it grows: ids, the text so far, and how it ended."""

    def __init__(self, state: State, body: ResponsesBody, choice: _ChoiceState) -> None:
        self.state, self.body, self.choice = state, body, choice
        self.id = "resp_" + uuid.uuid4().hex
        self.item_id = "msg_" + uuid.uuid4().hex
        self.created = int(time.time())

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": "".join(self.choice.text), "annotations": []}

    def item(self, done: bool) -> dict[str, Any]:
        content = [self.part()] if done else []
        status = "completed" if done else "in_progress"
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(self, done: bool) -> dict[str, Any]:
        cut = self.choice.finish_reason == "length"
        status = "in_progress" if not done else "incomplete" if cut else "completed"
        prompt, completion = self.choice.prompt_tokens, self.choice.completion_tokens
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.state.model_id,
            "output": [self.item(True)] if done else [],
            "instructions": self.body.instructions,
            "max_output_tokens": self.body.max_output_tokens,
            "temperature": self.body.temperature,
            "top_p": self.body.top_p,
            "incomplete_details": {"reason": "max_output_tokens"} if done and cut else None,
            "error": None,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "metadata": (self.body.model_extra or {}).get("metadata") or {},
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": self.choice.cached_tokens},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
            if done
            else None,
        }


async def _events(reply: _Reply, handles: list[Any], events: Any) -> AsyncIterator[bytes]:
    """OpenAI's stream of events for one text reply (see the module docstring); an error ends it with an error
    event."""
    sequence = 0

    def event(kind: str, **data: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        payload = {"type": kind, "sequence_number": sequence - 1, **data}
        return format_sse_event(event=kind, data_str=json.dumps(payload, ensure_ascii=False))

    where = {"item_id": reply.item_id, "output_index": 0, "content_index": 0}
    try:
        yield event("response.created", response=reply.response(False))
        yield event("response.in_progress", response=reply.response(False))
        yield event("response.output_item.added", output_index=0, item=reply.item(False))
        yield event(
            "response.content_part.added",
            **where,
            part={"type": "output_text", "text": "", "annotations": []},
        )
        while reply.choice.finish_reason is None:
            _, out = await events.get()
            _take(reply.choice, out)
            if reply.choice.error:
                yield event("error", code="generation_failed", message=reply.choice.error, param=None)
                return
            if out.text:
                yield event("response.output_text.delta", **where, delta=out.text, logprobs=[])
        text = "".join(reply.choice.text)
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=reply.part())
        yield event("response.output_item.done", output_index=0, item=reply.item(True))
        kind = "response.incomplete" if reply.choice.finish_reason == "length" else "response.completed"
        yield event(kind, response=reply.response(True))
    finally:
        for h in handles:
            h.cancel()


def add_responses_route(app: FastAPI, state: State) -> None:
    @app.post("/v1/responses")
    async def responses(body: ResponsesBody, http: HTTPRequest) -> Response:
        _refuse(body)
        _require_ready(state)
        handles, states, events = _submit(state, http, [_choice(state, body)])
        reply = _Reply(state, body, states[0])
        if body.stream:
            return _event_stream(state, _events(reply, handles, events), handles, events)
        await _gather(http, handles, states, events)
        return JSONResponse(reply.response(True))
