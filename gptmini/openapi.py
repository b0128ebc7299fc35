"""`GET /openapi.json`: FastAPI's document of `gptmini serve`, made true to what the server answers.

FastAPI writes the routes and the request bodies from their pydantic models; this module adds what those cannot
say, and takes away what the server never answers:

  * per route, exactly the statuses it answers, each error in OpenAI's shape (`Error`): 400 (never FastAPI's 422),
    401 (only when the server has keys; `/health` never asks), 404 for an unknown model, 413 for a body over
    --max-body, 429 when the queue is full (the generation routes), 500 when a generation fails, 503 while the model
    loads or the server stops;
  * the success bodies (JSON, and the SSE events of `stream: true`, each `data:` a JSON object or `[DONE]`),
    `/metrics` as Prometheus text, and the headers that come with 401, 429 and 503;
  * request fields as the server reads them: chat messages (roles, text parts, a system message only first, never
    empty), token ids inside the vocabulary, token-id prompts within the context, `n` and the number of prompts
    within --parallel + --max-queue, the fields it does not implement only at the values that ask for nothing, and
    structured output (`response_format`, `tools` / `tool_choice`, `guided_*`: one at a time).

What JSON Schema cannot say is written in the descriptions: a text prompt's length in tokens, a named
`tool_choice` being one of `tools`, and which JSON schemas and regular expressions llguidance compiles. Each is a
400 naming its field. tests/test_schemathesis.py holds the server to this document (schemathesis, every check).
"""

from __future__ import annotations

import copy
from typing import Any

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
NULL = {"type": "null"}
STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
IGNORED = {"description": "taken, and ignored"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, NULL]}


def _object(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    return {**out, **extra}


SHARED: dict[str, Any] = {}  # components/schemas of the document besides the request bodies


def _shared(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` as a named component of the document: a reference to it."""
    SHARED[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def _absent(*names: str) -> dict[str, Any]:
    """Each of `names` absent or null."""
    return {"properties": dict.fromkeys(names, NULL)}


def _digits_below(n: int) -> str:
    """A regular expression of the decimal integers 0..n-1 (leading zeros allowed: int() reads them)."""
    top = str(n - 1)
    alternatives = [f"[0-9]{{1,{len(top) - 1}}}"] if len(top) > 1 else []
    for i, d in enumerate(top):
        if d != "0":
            rest = len(top) - i - 1
            alternatives.append(top[:i] + f"[0-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives.append(top)
    return f"^0*(?:{'|'.join(alternatives)})$"


# ---- responses ------------------------------------------------------------------------------------------------

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": STRING}}
STATUS = {
    "400": "a field is missing, of the wrong type or out of range (`param` names it)",
    "401": "no API key, or a wrong one",
    "404": "no such model",
    "413": "the body is larger than --max-body",
    "429": "every row is busy and the queue is full (retry after Retry-After)",
    "500": "the generation failed",
    "503": "the model is still loading (Retry-After), or the server is stopping",
}
GENERATE = ("400", "401", "413", "429", "500", "503")
# What each route answers besides its success (401 only where the server has keys).
ROUTE_ERRORS: dict[tuple[str, str], tuple[str, ...]] = {
    ("get", "/health"): (),
    ("get", "/v1/models"): ("401",),
    ("get", "/v1/models/{model}"): ("401", "404"),
    ("get", "/metrics"): ("401",),
    ("get", "/tokenizer_info"): ("401", "503"),
    ("post", "/tokenize"): ("400", "401", "413", "503"),
    ("post", "/detokenize"): ("400", "401", "413", "503"),
    ("post", "/v1/completions"): GENERATE,
    ("post", "/v1/chat/completions"): GENERATE,
    ("post", "/v1/responses"): GENERATE,
}

USAGE = _shared(
    "Usage",
    _object(
        {
            "prompt_tokens": INTEGER,
            "completion_tokens": INTEGER,
            "total_tokens": INTEGER,
            "prompt_tokens_details": _object({"cached_tokens": INTEGER}, ("cached_tokens",)),
        },
        ("prompt_tokens", "completion_tokens", "total_tokens"),
    ),
)
COMPLETION_LOGPROBS = _shared(
    "CompletionLogprobs",
    _object(
        {
            "tokens": {"type": "array", "items": STRING},
            "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
            "top_logprobs": {
                "type": "array",
                "items": {"anyOf": [{"type": "object", "additionalProperties": NUMBER}, NULL]},
            },
            "text_offset": {"type": "array", "items": INTEGER},
        },
        ("tokens", "token_logprobs", "top_logprobs", "text_offset"),
    ),
)
_TOKEN_LOGPROB = {
    "token": STRING,
    "logprob": NUMBER,
    "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
}
CHAT_LOGPROBS = _shared(
    "ChatLogprobs",
    _object(
        {
            "content": {
                "type": "array",
                "items": _object(
                    {
                        **_TOKEN_LOGPROB,
                        "top_logprobs": {
                            "type": "array",
                            "items": _object(_TOKEN_LOGPROB, tuple(_TOKEN_LOGPROB)),
                        },
                    },
                    (*_TOKEN_LOGPROB, "top_logprobs"),
                ),
            },
            "refusal": NULL,
        },
        ("content",),
    ),
)
TOOL_CALL = _shared(
    "ToolCall",
    _object(
        {
            "id": STRING,
            "type": {"const": "function"},
            "function": _object({"name": STRING, "arguments": STRING}, ("name", "arguments")),
        },
        ("id", "type", "function"),
    ),
)
_HEAD = {"id": STRING, "created": INTEGER, "model": STRING, "system_fingerprint": NULL}


def _text_choice(finish_reasons: list[str | None]) -> dict[str, Any]:
    """A completions choice (whole or a stream's chunk: they differ in the finish reasons they may hold)."""
    return _object(
        {
            "index": INTEGER,
            "text": STRING,
            "logprobs": _nullable(COMPLETION_LOGPROBS),
            "finish_reason": {"enum": finish_reasons},
        },
        ("index", "text", "logprobs", "finish_reason"),
    )


COMPLETION = _shared(
    "Completion",
    _object(
        {
            **_HEAD,
            "object": {"const": "text_completion"},
            "choices": {
                "type": "array",
                "items": _text_choice(["stop", "length"]),
            },
            "usage": USAGE,
        },
        ("id", "object", "created", "model", "choices", "usage"),
    ),
)
CHAT_COMPLETION = _shared(
    "ChatCompletion",
    _object(
        {
            **_HEAD,
            "object": {"const": "chat.completion"},
            "choices": {
                "type": "array",
                "items": _object(
                    {
                        "index": INTEGER,
                        "message": _object(
                            {
                                "role": {"const": "assistant"},
                                "content": {"type": ["string", "null"]},
                                "refusal": NULL,
                                "tool_calls": {"type": "array", "items": TOOL_CALL},
                            },
                            ("role", "content"),
                        ),
                        "logprobs": _nullable(CHAT_LOGPROBS),
                        "finish_reason": {"enum": ["stop", "length", "tool_calls"]},
                    },
                    ("index", "message", "logprobs", "finish_reason"),
                ),
            },
            "usage": USAGE,
        },
        ("id", "object", "created", "model", "choices", "usage"),
    ),
)
_CHUNK_USAGE = {"usage": _nullable(USAGE)}
COMPLETION_CHUNK = _shared(
    "CompletionChunk",
    _object(
        {
            **_HEAD,
            **_CHUNK_USAGE,
            "object": {"const": "text_completion"},
            "choices": {
                "type": "array",
                "items": _text_choice(["stop", "length", None]),  # None until the choice's last chunk
            },
        },
        ("id", "object", "created", "model", "choices"),
    ),
)
CHAT_CHUNK = _shared(
    "ChatCompletionChunk",
    _object(
        {
            **_HEAD,
            **_CHUNK_USAGE,
            "object": {"const": "chat.completion.chunk"},
            "choices": {
                "type": "array",
                "items": _object(
                    {
                        "index": INTEGER,
                        "delta": _object(
                            {
                                "role": {"const": "assistant"},
                                "content": STRING,
                                "tool_calls": {
                                    "type": "array",
                                    "items": _object(
                                        {
                                            "index": INTEGER,
                                            "id": STRING,
                                            "type": {"const": "function"},
                                            "function": _object({"name": STRING, "arguments": STRING}),
                                        },
                                        ("index",),
                                    ),
                                },
                            }
                        ),
                        "logprobs": _nullable(CHAT_LOGPROBS),
                        "finish_reason": {"enum": ["stop", "length", "tool_calls", None]},
                    },
                    ("index", "delta", "logprobs", "finish_reason"),
                ),
            },
        },
        ("id", "object", "created", "model", "choices"),
    ),
)
_OUTPUT_TEXT = _shared(
    "OutputText",
    _object(
        {"type": {"const": "output_text"}, "text": STRING, "annotations": {"type": "array", "maxItems": 0}},
        ("type", "text", "annotations"),
    ),
)
_MESSAGE_ITEM = _shared(
    "OutputMessage",
    _object(
        {
            "type": {"const": "message"},
            "id": STRING,
            "status": {"enum": ["in_progress", "completed"]},
            "role": {"const": "assistant"},
            "content": {"type": "array", "items": _OUTPUT_TEXT},
        },
        ("type", "id", "status", "role", "content"),
    ),
)
RESPONSE = _shared(
    "Response",
    _object(
        {
            "id": STRING,
            "object": {"const": "response"},
            "created_at": INTEGER,
            "status": {"enum": ["in_progress", "completed", "incomplete"]},
            "model": STRING,
            "output": {"type": "array", "items": _MESSAGE_ITEM},
            "instructions": {"type": ["string", "null"]},
            "max_output_tokens": {"type": ["integer", "null"]},
            "temperature": NUMBER,
            "top_p": NUMBER,
            "incomplete_details": _nullable(_object({"reason": {"const": "max_output_tokens"}}, ("reason",))),
            "error": NULL,
            "parallel_tool_calls": {"const": False},
            "tool_choice": {"const": "none"},
            "tools": {"type": "array", "maxItems": 0},
            "text": {"const": {"format": {"type": "text"}}},
            "metadata": {},
            "usage": _nullable(
                _object(
                    {
                        "input_tokens": INTEGER,
                        "input_tokens_details": _object({"cached_tokens": INTEGER}, ("cached_tokens",)),
                        "output_tokens": INTEGER,
                        "output_tokens_details": _object(
                            {"reasoning_tokens": INTEGER}, ("reasoning_tokens",)
                        ),
                        "total_tokens": INTEGER,
                    },
                    ("input_tokens", "output_tokens", "total_tokens"),
                )
            ),
        },
        ("id", "object", "created_at", "status", "model", "output", "usage"),
    ),
)
RESPONSE_EVENT = _shared(
    "ResponseEvent",
    {
        "type": "object",
        "required": ["type", "sequence_number"],
        "properties": {
            "type": STRING,
            "sequence_number": {"type": "integer", "minimum": 0},
            "response": RESPONSE,
            "item": _MESSAGE_ITEM,
            "part": _OUTPUT_TEXT,
            "item_id": STRING,
            "output_index": INTEGER,
            "content_index": INTEGER,
            "delta": STRING,
            "text": STRING,
            "message": STRING,
        },
        "oneOf": [
            {
                "properties": {
                    "type": {"enum": ["response.created", "response.in_progress", "response.completed"]}
                },
                "required": ["response"],
            },
            {"properties": {"type": {"const": "response.incomplete"}}, "required": ["response"]},
            {
                "properties": {"type": {"const": "response.output_item.added"}},
                "required": ["output_index", "item"],
            },
            {
                "properties": {"type": {"const": "response.output_item.done"}},
                "required": ["output_index", "item"],
            },
            {
                "properties": {"type": {"const": "response.content_part.added"}},
                "required": ["item_id", "part"],
            },
            {
                "properties": {"type": {"const": "response.content_part.done"}},
                "required": ["item_id", "part"],
            },
            {
                "properties": {"type": {"const": "response.output_text.delta"}},
                "required": ["item_id", "delta"],
            },
            {"properties": {"type": {"const": "response.output_text.done"}}, "required": ["item_id", "text"]},
            {"properties": {"type": {"const": "error"}}, "required": ["message"]},
        ],
    },
)


def _events(data: dict[str, Any], *, named: bool = False) -> dict[str, Any]:
    """An SSE media type whose every event's `data` is `[DONE]` or JSON valid under `data` (OpenAPI 3.2's
    `itemSchema`; schemathesis validates each event with it)."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    item = _object(
        {"data": json_data if named else {"anyOf": [{"const": "[DONE]"}, json_data]}, "event": STRING},
        ("data",),
    )
    return {"itemSchema": item}


def _streams(body: dict[str, Any], chunk: dict[str, Any]) -> dict[str, Any]:
    error = {"$ref": "#/components/schemas/Error"}
    return {
        "application/json": {"schema": body},
        "text/event-stream": _events({"anyOf": [chunk, error]}),
    }


MODEL_CARD = _shared(
    "Model",
    _object(
        {
            "id": STRING,
            "object": {"const": "model"},
            "created": INTEGER,
            "owned_by": STRING,
            "context_length": INTEGER,
        },
        ("id", "object", "created", "owned_by"),
    ),
)
SUCCESS: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("get", "/health"): (
        "ready",
        {"application/json": {"schema": _object({"status": {"const": "ok"}}, ("status",))}},
    ),
    ("get", "/v1/models"): (
        "the served model",
        {
            "application/json": {
                "schema": _object(
                    {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL_CARD}},
                    ("object", "data"),
                )
            }
        },
    ),
    ("get", "/v1/models/{model}"): ("the model", {"application/json": {"schema": MODEL_CARD}}),
    ("get", "/metrics"): ("Prometheus metrics (text format 0.0.4)", {"text/plain": {"schema": STRING}}),
    ("get", "/tokenizer_info"): (
        "the tokenizer, as Hugging Face's tokenizer_config.json for GPT-2 says it",
        {
            "application/json": {
                "schema": _object(
                    {
                        "tokenizer_class": STRING,
                        "model_max_length": INTEGER,
                        "vocab_size": INTEGER,
                        "eos_token_id": INTEGER,
                    },
                    ("tokenizer_class", "model_max_length", "vocab_size", "eos_token_id"),
                )
            }
        },
    ),
    ("post", "/tokenize"): (
        "the ids (with_pieces: llama.cpp's {id, piece}; a piece that is no whole UTF-8 text is its bytes)",
        {
            "application/json": {
                "schema": _object(
                    {
                        "count": INTEGER,
                        "max_model_len": INTEGER,
                        "tokens": {
                            "anyOf": [
                                {"type": "array", "items": INTEGER},
                                {
                                    "type": "array",
                                    "items": _object(
                                        {
                                            "id": INTEGER,
                                            "piece": {"anyOf": [STRING, {"type": "array", "items": INTEGER}]},
                                        },
                                        ("id", "piece"),
                                    ),
                                },
                            ]
                        },
                        "token_strs": _nullable({"type": "array", "items": STRING}),
                    },
                    ("count", "max_model_len", "tokens", "token_strs"),
                )
            }
        },
    ),
    ("post", "/detokenize"): (
        "the text (vLLM's `prompt`, llama.cpp's `content`)",
        {
            "application/json": {
                "schema": _object({"prompt": STRING, "content": STRING}, ("prompt", "content"))
            }
        },
    ),
    ("post", "/v1/completions"): (
        "the completion; with `stream: true`, its chunks as server-sent events, then `[DONE]`",
        _streams(COMPLETION, COMPLETION_CHUNK),
    ),
    ("post", "/v1/chat/completions"): (
        "the chat completion; with `stream: true`, its chunks as server-sent events, then `[DONE]`",
        _streams(CHAT_COMPLETION, CHAT_CHUNK),
    ),
    ("post", "/v1/responses"): (
        "the response; with `stream: true`, OpenAI's events (`event:` names the type)",
        {
            "application/json": {"schema": RESPONSE},
            "text/event-stream": _events(RESPONSE_EVENT, named=True),
        },
    ),
}


def _responses(method: str, path: str, keys: bool) -> dict[str, Any]:
    summary, content = SUCCESS[(method, path)]
    out: dict[str, Any] = {"200": {"description": summary, "content": copy.deepcopy(content)}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for code in ROUTE_ERRORS[(method, path)]:
        if code == "401" and not keys:
            continue
        answer: dict[str, Any] = {"description": STATUS[code], "content": error}
        if code == "401":
            answer["headers"] = {
                "WWW-Authenticate": {"required": True, "schema": STRING, "description": "Bearer (or Basic)"}
            }
        elif code in ("429", "503"):
            answer["headers"] = RETRY_AFTER
        out[code] = answer
    if path == "/health":
        status = {"enum": ["loading", "error"]}
        out["503"] = {
            "description": "the model is still loading, or failed to load",
            "content": {"application/json": {"schema": _object({"status": status}, ("status",))}},
        }
    return out


# ---- requests -------------------------------------------------------------------------------------------------

TEXT_PART = _object({"type": {"const": "text"}, "text": STRING}, ("type", "text"))
CONTENT = {"anyOf": [STRING, {"type": "array", "items": TEXT_PART}]}
# The roles a message may have, and what each holds (fields besides these are ignored).
_SYSTEM = _shared(
    "SystemMessage",
    _object({"role": {"enum": ["system", "developer"]}, "content": CONTENT}, ("role", "content")),
)
_USER = _shared("UserMessage", _object({"role": {"const": "user"}, "content": CONTENT}, ("role", "content")))
_ASSISTANT = _shared(
    "AssistantMessage",
    _object(
        {
            "role": {"const": "assistant"},
            "content": {"anyOf": [CONTENT, NULL]},
            "tool_calls": {
                "description": "earlier calls, written into the conversation as JSON text (any other value: ignored)"
            },
        },
        ("role",),
    ),
)
_TOOL = _shared(
    "ToolMessage",
    _object(
        {
            "role": {"const": "tool"},
            "content": CONTENT,
            "tool_call_id": {
                "description": "the call this is the result of (written into the text as it is)"
            },
        },
        ("role", "content"),
        description="a call's result: the user's turn in the chat template",
    ),
)
MESSAGES = {
    "type": "array",
    "minItems": 1,
    "prefixItems": [{"anyOf": [_SYSTEM, _USER, _ASSISTANT, _TOOL]}],
    "items": {"anyOf": [_USER, _ASSISTANT, _TOOL]},
    "description": "the conversation; a system (or developer) message may only come first. Its prompt, in the "
    "chat template, must fit the model's context (context_length in GET /v1/models): else a 400",
}
_JSON_SCHEMA = {
    "type": "object",
    "description": "a JSON schema (one that llguidance cannot decode under is a 400)",
}
RESPONSE_FORMAT = _shared(
    "ResponseFormat",
    {
        "anyOf": [
            _object({"type": {"const": "text"}}, ("type",)),
            _object({"type": {"const": "json_object"}}, ("type",)),
            _object(
                {
                    "type": {"const": "json_schema"},
                    "json_schema": _object({"name": IGNORED, "schema": _JSON_SCHEMA, "strict": IGNORED}),
                },
                ("type", "json_schema"),
            ),
        ]
    },
)
TOOL = _shared(
    "Tool",
    _object(
        {
            "type": {"const": "function"},
            "function": _object(
                {"name": {"type": "string", "minLength": 1}, "parameters": _JSON_SCHEMA},
                ("name",),
            ),
        },
        ("type", "function"),
    ),
)
NAMED_CHOICE = _shared(
    "NamedToolChoice",
    _object(
        {"type": {"const": "function"}, "function": _object({"name": STRING}, ("name",))},
        ("type", "function"),
        description="this function (one of `tools`: else a 400)",
    ),
)
GUIDED_REGEX = {
    "type": "string",
    "format": "regex",
    "description": "the whole reply matches it (Rust's regex syntax: one llguidance cannot compile is a 400)",
}
GUIDED_CHOICE = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
STRUCTURE_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


def _structures(chat: bool) -> dict[str, Any]:
    """At most one of `response_format` (other than text), `guided_json`, `guided_regex`, `guided_choice` and a
    tool call (chat: `tools` with `tool_choice` "required" or a named function)."""
    text_format = {"anyOf": [NULL, _object({"type": {"const": "text"}}, ("type",))]}
    tools = {"anyOf": [NULL, {"type": "array", "items": TOOL}]}
    if chat:
        no_call = {
            "anyOf": [
                {
                    "properties": {"tools": tools, "tool_choice": {"const": "none"}},
                    "required": ["tool_choice"],
                },
                {
                    "properties": {
                        "tools": {"anyOf": [NULL, {"type": "array", "maxItems": 0}]},
                        "tool_choice": NULL,
                    }
                },
            ]
        }
        call = {
            "properties": {
                "tools": {"type": "array", "items": TOOL, "minItems": 1},
                "tool_choice": {"anyOf": [{"const": "required"}, NAMED_CHOICE]},
            },
            "required": ["tools", "tool_choice"],
        }
    else:  # only chat calls tools
        no_call = {
            "properties": {
                "tools": {"anyOf": [NULL, {"type": "array", "maxItems": 0}]},
                "tool_choice": {"anyOf": [NULL, {"const": "none"}]},
            }
        }
    one = []
    for name in STRUCTURE_FIELDS:
        others = [f for f in STRUCTURE_FIELDS if f != name]
        rest = _absent(*(f for f in others if f != "response_format"))
        if "response_format" in others:
            rest["properties"]["response_format"] = text_format
        one.append({"allOf": [rest, no_call], "required": [name]})
    nothing = _absent(*STRUCTURE_FIELDS[1:])
    nothing["properties"]["response_format"] = text_format
    one.append({"allOf": [nothing, no_call]})
    if chat:
        one.append({"allOf": [nothing, call]})
    return {"anyOf": one}


def _token_ids(vocab: int | None) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, **({"maximum": vocab - 1} if vocab else {})}


def _common(props: dict[str, Any], state: Any, *, unsupported: dict[str, tuple[Any, ...]]) -> None:
    """The fields completions and chat share, as the server reads them."""
    from gptmini.openai_api import INT64_MAX, INT64_MIN, MAX_N, MAX_STOPS

    settings, lm = state.settings, state.lm
    capacity = settings.parallel + settings.max_queue
    props["seed"] = _nullable({"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX})
    props["n"] = {"type": "integer", "minimum": 1, "maximum": min(MAX_N, capacity), "default": 1}
    props["stop"] = {
        "anyOf": [STRING, {"type": "array", "items": STRING, "maxItems": MAX_STOPS}, NULL],
        "description": "stop sequences (empty ones are ignored)",
    }
    bias = {"type": "number", "minimum": -100, "maximum": 100}
    props["logit_bias"] = _nullable(
        {
            "type": "object",
            "additionalProperties": bias,
            "propertyNames": {"pattern": _digits_below(lm.config.vocab_size) if lm else "^[0-9]+$"},
            "description": "token id (in decimal) -> bias added to its logit",
        }
    )
    props["stream_options"] = _nullable(_object({"include_usage": {"type": "boolean"}}))
    props["response_format"] = _nullable(RESPONSE_FORMAT)
    props["guided_json"] = _nullable(
        {
            **_JSON_SCHEMA,
            "description": f"{_JSON_SCHEMA['description']}; vLLM's JSON text of one is taken too",
        }
    )
    props["guided_regex"] = _nullable(GUIDED_REGEX)
    props["guided_choice"] = _nullable(GUIDED_CHOICE)
    props["tools"] = {"anyOf": [NULL, {"type": "array", "items": TOOL}]}
    props["tool_choice"] = {"anyOf": [NULL, {"enum": ["none", "required"]}, NAMED_CHOICE]}
    if "lookup" in props:
        props["lookup"] = {
            **props["lookup"],
            "description": "prompt-lookup draft tokens per pass (null: the server's --lookup); above 0 with a "
            "structure (response_format json, guided_*, a tool call) it is a 400: a draft would skip the grammar",
        }
    for name, allowed in unsupported.items():
        if name in props:
            props[name] = {
                "enum": list(allowed),
                "description": "not implemented: only these values are taken",
            }


def _bodies(components: dict[str, Any], state: Any) -> None:
    from gptmini.openai_api import UNSUPPORTED
    from gptmini.responses_api import HARMLESS, METADATA

    lm, settings = state.lm, state.settings
    capacity = settings.parallel + settings.max_queue
    vocab = lm.config.vocab_size if lm else None
    block = lm.config.block_size if lm else None
    ids = {
        "type": "array",
        "items": _token_ids(vocab),
        "minItems": 1,
        **({"maxItems": block} if block else {}),
    }

    completion = components["CompletionBody"]
    props = completion["properties"]
    _common(props, state, unsupported=UNSUPPORTED)
    props["prompt"] = {
        "anyOf": [
            STRING,
            {"type": "array", "items": STRING, "minItems": 1, "maxItems": capacity},
            ids,
            {"type": "array", "items": ids, "minItems": 1, "maxItems": capacity},
        ],
        "description": "a text, texts, token ids, or lists of token ids; each prompt must fit the context "
        "(a text's tokens too: else a 400), and prompts × n must not pass --parallel + --max-queue",
    }
    completion["allOf"] = [_structures(chat=False)]

    chat = components["ChatBody"]
    props = chat["properties"]
    _common(props, state, unsupported=UNSUPPORTED)
    props["messages"] = MESSAGES
    chat["allOf"] = [_structures(chat=True)]

    responses = components["ResponsesBody"]
    props = responses["properties"]
    parts = {
        "anyOf": [
            STRING,
            {
                "type": "array",
                "items": _object(
                    {"type": {"enum": ["input_text", "output_text"]}, "text": STRING}, ("type", "text")
                ),
            },
        ]
    }
    kind = {"type": {"const": "message"}}
    system = _object(
        {**kind, "role": {"enum": ["system", "developer"]}, "content": parts}, ("role", "content")
    )
    others = {
        "anyOf": [
            _object({**kind, "role": {"enum": ["user", "tool"]}, "content": parts}, ("role", "content")),
            _object({**kind, "role": {"const": "assistant"}, "content": {"anyOf": [parts, NULL]}}, ("role",)),
        ]
    }
    props["input"] = {
        "anyOf": [
            STRING,
            {"type": "array", "items": others},
            {"type": "array", "prefixItems": [system], "items": others},
        ],
        "description": "a text (the user's), or messages: a system (or developer) message only first, and none "
        "after `instructions`; the conversation's prompt must fit the model's context: else a 400",
    }
    # with instructions (the system message), messages may be none, and none of them a system message
    responses["if"] = _object({"instructions": {"type": "string", "minLength": 1}}, ("instructions",))
    responses["then"] = {"properties": {"input": {"anyOf": [STRING, {"type": "array", "items": others}]}}}
    responses["else"] = {"properties": {"input": {"anyOf": [STRING, {"type": "array", "minItems": 1}]}}}
    for name in METADATA:
        props[name] = {"description": "metadata: taken, and changes nothing"}
    for name, allowed in HARMLESS.items():
        props[name] = {"enum": list(allowed), "description": "not implemented: only these values are taken"}
    responses["additionalProperties"] = False

    tokenize = components["TokenizeBody"]
    props = tokenize["properties"]
    props["messages"] = _nullable(MESSAGES)
    tokenize["oneOf"] = [
        {"required": [name], "properties": {name: {"not": NULL}}}
        for name in ("prompt", "content", "messages")
    ]
    tokenize["description"] = "exactly one of prompt (or llama.cpp's content) and messages"

    components["DetokenizeBody"]["properties"]["tokens"] = {"type": "array", "items": _token_ids(vocab)}


# ---- examples (schemathesis sends each in its examples phase) --------------------------------------------------

_ASK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Good morrow"}]
_WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/completions": {
        "text": {"prompt": "To be, or not", "max_tokens": 8},
        "stream": {
            "prompt": "To be, or not",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": 2,
            "echo": True,
        },
        "token ids, several prompts": {"prompt": [[1, 2, 3], [4]], "n": 2, "max_tokens": 2, "seed": 7},
        "regex": {"prompt": "The answer:", "guided_regex": "(yes|no)", "max_tokens": 4},
    },
    "/v1/chat/completions": {
        "chat": {"messages": _ASK, "max_tokens": 8},
        "stream": {"messages": _ASK, "max_tokens": 4, "stream": True, "logprobs": True, "top_logprobs": 2},
        "JSON": {"messages": _ASK, "max_tokens": 8, "response_format": {"type": "json_object"}},
        "tool call, streamed": {
            "messages": _ASK,
            "max_tokens": 8,
            "tools": [_WEATHER],
            "tool_choice": "required",
            "stream": True,
        },
    },
    "/v1/responses": {
        "text": {"input": "Good morrow", "max_output_tokens": 8},
        "stream": {
            "instructions": "You are terse.",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Good morrow"}]}],
            "max_output_tokens": 4,
            "stream": True,
        },
    },
    "/tokenize": {
        "text": {"prompt": "To be, or not"},
        "chat, with pieces": {"messages": _ASK, "with_pieces": True, "return_token_strs": True},
    },
    "/detokenize": {"ids": {"tokens": [1, 2, 3]}},
}


# ---- the document ---------------------------------------------------------------------------------------------


def document(app: Any, state: Any) -> dict[str, Any]:
    """The OpenAPI document (3.1) of `app`, a `gptmini.server.create_app` app whose state is `state`."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title,
        version=app.version,
        routes=app.routes,
        description="OpenAI's API (and vLLM's tokenizer routes) over a gptmini model. Every error is "
        '`{"error": {"message", "type", "param", "code"}}`.',
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["Error"] = ERROR_SCHEMA
    components.update(copy.deepcopy(SHARED))
    _bodies(components, state)
    keys = bool(state.settings.api_keys)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            operation["responses"] = _responses(method, path, keys)
            if path in EXAMPLES:
                body = operation["requestBody"]["content"]["application/json"]
                body["examples"] = {name: {"value": value} for name, value in EXAMPLES[path].items()}
            if keys and path == "/health":
                operation["security"] = []  # never asks for the key
    if keys:
        schema["components"]["securitySchemes"] = {
            "key": {
                "type": "http",
                "scheme": "bearer",
                "description": "the --api-key (or Basic auth with the key as the password)",
            }
        }
        schema["security"] = [{"key": []}]
    return schema
