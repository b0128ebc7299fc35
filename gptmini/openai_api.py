"""OpenAI's completions and chat completions over the engine: the request bodies as the server reads them, their
translation into engine `Request`s (sampling, stops, structure, capacity, context), and the `Output`s back into
OpenAI's JSON and SSE (choices, logprobs, tool calls, usage), with `GET /v1/models` and `/metrics`.

A request field the server does not implement is refused with a 400 naming it (`UNSUPPORTED`), never silently
ignored. `gptmini.server` builds the app (auth, limits, errors, the page) and adds these routes;
`gptmini.structured_api` reads the structure fields, `gptmini.responses_api` is `POST /v1/responses`.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gptmini.errors import UserError
from gptmini.lookup import MAX_LOOKUP
from gptmini.server_state import APIError, State, _require_ready

log = logging.getLogger("gptmini.server")

MAX_N = 16  # choices per request
MAX_STOPS = 16  # lm-eval adds the EOS text to a task's stops
MAX_TOKENS = 32768  # per choice; generation slides past the context window, so this bounds time, not memory
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # OpenAI's `seed`


# ---- request bodies -------------------------------------------------------------------------------------------


def whole_numbers(value: Any) -> Any:
    """JSON has one kind of number: 2.0 is the integer 2, as JSON Schema's `integer` says (strict pydantic models
    refuse it for an int field; float fields take ints). Integral floats become ints, in lists too; 2.5 stays."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Parameters both endpoints take. Fields outside OpenAI's request are ignored; OpenAI's fields that the server
    does not implement are declared (as `Any`) only to be refused by `_refuse_unsupported` unless harmless."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    _whole = field_validator("*", mode="before")(whole_numbers)
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # extension; None, 0 or -1: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # extension
    repetition_penalty: float = Field(1.0, gt=0.0)  # extension
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = Field(None)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension
    lookup: int | None = Field(None, ge=0, le=MAX_LOOKUP)  # extension: prompt-lookup decoding; None: --lookup
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # OpenAI's; None = 0
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON's keys) -> -100..100
    # structured output (gptmini.structured_api): OpenAI's, then vLLM's extensions
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # one call is always within it
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    # not implemented: refused unless absent or harmless (see UNSUPPORTED)
    functions: Any = None
    function_call: Any = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # candidates per prompt; the n most likely are returned
    suffix: Any = None  # not implemented


class ChatBody(_Common):
    messages: list[Any]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)
    # not implemented: refused unless absent or harmless
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


# OpenAI request fields this server does not implement, each with the values that ask for nothing (OpenAI's
# defaults). Anything else is a 400 naming the field: a client must never believe a setting was applied.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "functions": (None, []),  # the deprecated form of `tools`
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
}


def _harmless(value: Any, allowed: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    return not isinstance(value, bool) and value in allowed  # True == 1 in Python: a bool is no number here


def _refuse_unsupported(body: BaseModel) -> None:
    """A 400 naming the first field the request sets that the server does not implement."""
    for name, allowed in UNSUPPORTED.items():
        if name in type(body).model_fields and not _harmless(getattr(body, name), allowed):
            hint = f" or send {json.dumps(allowed[1])}" if len(allowed) > 1 else ""
            raise APIError(
                400,
                f"{name}: not supported by this server (leave it out{hint})",
                param=name,
                code="unsupported_parameter",
            )


def _add_openai_routes(app: FastAPI, state: State) -> None:
    """OpenAI's routes (and /metrics)."""

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != state.model_id:
            raise APIError(
                404,
                f"the model '{model}' does not exist; see GET /v1/models",
                param="model",
                code="model_not_found",
            )
        return state.model_card()

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest) -> Response:
        _refuse_unsupported(body)
        _require_ready(state)
        return await _serve(state, http, _completion_requests(state, body), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest) -> Response:
        _refuse_unsupported(body)
        _require_ready(state)
        return await _serve(state, http, _chat_requests(state, body), body, chat=True)


# ---- requests in --------------------------------------------------------------------------------------------


@dataclass
class _Choice:
    """One choice to generate: the engine request and what the response needs to know about it."""

    request: Any  # gptmini.engine.Request
    prompt_index: int
    prompt_text: str = ""  # for echo
    structure: Any = None  # gptmini.structured_api.Structure: a tool call's reply is answered as `tool_calls`


def _sampling(body: _Common, stops: list[str], seed_offset: int) -> Any:
    from gptmini.api import sampling_config
    from gptmini.sampling import choice_seed

    top_k = body.top_k if body.top_k not in (None, 0, -1) else None
    seed = choice_seed(body.seed, seed_offset)
    try:
        return sampling_config(
            temperature=body.temperature,
            top_k=top_k,
            top_p=body.top_p if body.top_p < 1.0 else None,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            seed=seed,
            stop=stops,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            logit_bias=_logit_bias(body.logit_bias),
        )
    except UserError as e:
        raise APIError(400, str(e), param="logit_bias" if "logit-bias" in str(e) else None) from None


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's `logit_bias` (token ids as JSON's string keys) as {id: bias}."""
    out = {}
    for key, bias in (raw or {}).items():
        if not (key.isascii() and key.isdigit()):  # "²" is a digit to str.isdigit, and no int
            raise APIError(400, f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias")
        out[int(key)] = bias
    return out


def _structure(state: State, body: _Common, *, chat: bool) -> Any:
    from gptmini.structured_api import structure

    wanted = structure(body, state.lm.tokenizer, state.lm.config.vocab_size, chat=chat)
    if wanted.grammar is not None and body.lookup:  # (the server's --lookup just skips such rows)
        raise APIError(400, "lookup: prompt lookup does not combine with structured output", param="lookup")
    return wanted


def _lookup(state: State, body: _Common) -> int:
    """Draft tokens per verify pass: the request's `lookup`, else the server's `--lookup`."""
    return state.settings.lookup if body.lookup is None else body.lookup


def _stops(body: _Common) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop sequences, got {len(stops)}", param="stop")
    return [s for s in stops if s]


def _check_context(state: State, ids: list[int], param: str) -> None:
    block = state.lm.config.block_size
    if len(ids) > block:
        raise APIError(
            400,
            f"this model's maximum context length is {block} tokens, but the prompt has {len(ids)} tokens; "
            "shorten it",
            param=param,
            code="context_length_exceeded",
        )


def _check_capacity(state: State, prompts: int, n: int, name: str = "n") -> None:
    """A request with more choices than rows plus queue can never be taken: a 400, not a 429 to retry forever."""
    settings = state.settings
    limit = settings.parallel + settings.max_queue
    if prompts * n > limit:
        asked = (
            f"{prompts} prompts × {name}={n} = {prompts * n} choices"
            if prompts > 1
            else f"{name}={n} choices"
        )
        raise APIError(
            400,
            f"this request asks for {asked}, but the server takes at most {limit} at once "
            f"(--parallel {settings.parallel} + --max-queue {settings.max_queue}); send fewer per request",
            param="prompt" if prompts > 1 else name,
            code="too_many_choices",
        )


def _best_of(body: CompletionBody) -> int:
    """Candidates to generate per prompt: `best_of` (OpenAI's: at least `n`, not streamed), else `n`."""
    if body.best_of is None or body.best_of == body.n:
        return body.n
    if body.best_of < body.n:
        raise APIError(400, f"best_of ({body.best_of}) must be at least n ({body.n})", param="best_of")
    if body.stream:
        raise APIError(
            400, "best_of: candidates are ranked when complete, so they cannot stream", param="best_of"
        )
    return body.best_of


def _most_likely(states: list[_ChoiceState], n: int) -> list[_ChoiceState]:
    """Per prompt, the `n` candidates whose tokens have the highest mean log-probability, renumbered in order."""
    by_prompt: dict[int, list[_ChoiceState]] = {}
    for s in states:
        by_prompt.setdefault(s.choice.prompt_index, []).append(s)

    def mean_logprob(s: _ChoiceState) -> float:
        scores = [t.logprob for t in s.tokens if t.logprob is not None]
        return sum(scores) / len(scores) if scores else 0.0

    kept = [s for group in by_prompt.values() for s in sorted(group, key=mean_logprob, reverse=True)[:n]]
    for i, s in enumerate(kept):
        s.index = i
    return kept


def _encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A completions prompt as Hugging Face's GPT-2 tokenizer and vLLM read it: `<|endoftext|>` written in it is that
    token; the chat tokens stay text (only chat messages' roles make them)."""
    from gptmini.tokenizer import EOT

    return tokenizer.encode(text, allow_special={EOT})


def _completion_requests(state: State, body: CompletionBody) -> list[_Choice]:
    from gptmini.rows import Request

    tokenizer = state.lm.tokenizer
    prompts: list[str | list[int]]
    if isinstance(body.prompt, str):
        prompts = [body.prompt]
    elif body.prompt and all(isinstance(p, int) for p in body.prompt):
        prompts = [list(body.prompt)]  # one prompt as token ids
    else:
        prompts = list(body.prompt)
    if not prompts:
        raise APIError(400, "prompt: must not be an empty list", param="prompt")
    candidates = _best_of(body)
    _check_capacity(state, len(prompts), candidates, "n" if candidates == body.n else "best_of")
    for name, harmless in (("tools", (None, [])), ("tool_choice", (None, "none"))):
        if not _harmless(getattr(body, name), harmless):
            raise APIError(400, f"{name}: only /v1/chat/completions calls tools", param=name)
    wanted = _structure(state, body, chat=False)
    # A chat model's control tokens (<|end|>, <|user|>, …) end a text as <|endoftext|> does (ignore_eos: neither).
    ends = state.template.name == "tokens" and not body.ignore_eos
    stops = _stops(body) + (list(state.template.stop) if ends else [])
    choices = []
    for p_index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = _encode_prompt(tokenizer, prompt) or [tokenizer.eot_id]
            text = prompt
        else:
            ids = list(prompt)
            if not ids:
                raise APIError(400, "prompt: a token list must not be empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < state.lm.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary", param="prompt")
            text = tokenizer.decode(ids)
        _check_context(state, ids, "prompt")
        for j in range(candidates):
            request = Request(
                prompt_ids=ids,
                sampling=_sampling(body, stops, j),
                max_new_tokens=body.max_tokens if body.max_tokens is not None else 16,
                ignore_eos=body.ignore_eos,
                # best_of ranks candidates by their tokens' mean log-probability
                logprobs=body.logprobs if candidates == body.n else max(body.logprobs or 0, 0),
                prompt_logprobs=body.echo,
                lookup=_lookup(state, body),
                grammar=wanted.grammar,
            )
            choices.append(_Choice(request, p_index, text, wanted))
    return choices


def _chat_messages(raw: list[Any]) -> list[dict[str, str]]:
    """OpenAI messages → {role, content} with text content; content parts joined, "developer" read as system."""
    from gptmini.chat import check_messages
    from gptmini.structured_api import history_message

    messages = []
    for m in raw:
        if isinstance(m, dict):
            m = dict(m)
            if m.get("role") == "developer":
                m["role"] = "system"
            content = m.get("content")
            # text parts (of any role, a tool's result's too) are joined before anything reads the content
            if isinstance(content, list):
                texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                    raise APIError(400, "messages: only text content parts are supported", param="messages")
                m["content"] = "".join(texts)
            elif content is None and m.get("role") == "assistant":
                m["content"] = ""
            m = history_message(m)
        messages.append(m)
    try:
        return check_messages(messages)
    except UserError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None


def _chat_requests(state: State, body: ChatBody) -> list[_Choice]:
    from gptmini.rows import Request

    messages = _chat_messages(body.messages)
    _check_capacity(state, 1, body.n)
    wanted = _structure(state, body, chat=True)
    template = state.template
    ids = template.encode(state.lm.tokenizer, messages)
    _check_context(state, ids, "messages")
    block = state.lm.config.block_size
    max_tokens = body.max_completion_tokens or body.max_tokens or max(block - len(ids), 1)
    stops = [*template.stop, *_stops(body)]
    return [
        _Choice(
            Request(
                prompt_ids=ids,
                sampling=_sampling(body, stops, j),
                max_new_tokens=max_tokens,
                ignore_eos=body.ignore_eos,
                logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                strip_leading_space=template.name == "plain",
                lookup=_lookup(state, body),
                grammar=wanted.grammar,
            ),
            0,
            structure=wanted,
        )
        for j in range(body.n)
    ]


# ---- responses out --------------------------------------------------------------------------------------------


def _token_text(tokenizer: Any, token_id: int) -> tuple[str, bytes]:
    """A token as OpenAI shows it: its text, or `bytes:\\xNN…` when its bytes are not whole UTF-8 characters."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


class _ChoiceState:
    """What has been said for one choice so far (text, logprobs, finish reason)."""

    def __init__(self, index: int, choice: _Choice) -> None:
        self.index = index
        self.choice = choice
        self.text: list[str] = []
        self.tokens: list[Any] = []
        self.prompt_tokens_lp: list[Any] | None = None
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.prompt_tokens = len(choice.request.prompt_ids)
        self.cached_tokens = 0  # of the prompt, found in the engine's prefix cache
        self.text_offset = 0  # completions logprobs: characters before the next token
        # The returned text's characters, counted as tokens pass: a token holding part of a character adds nothing
        # until the token that completes it (so offsets never count U+FFFD the text does not hold).
        self.offset_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.error: str | None = None
        self.call_id = "call_" + uuid.uuid4().hex[:24]  # a tool call's id, when the reply is one
        self.call_started = False  # its first delta (id, name) was streamed


def _completion_logprobs(tokenizer: Any, tokens: list[Any], state: _ChoiceState) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text, _ = _token_text(tokenizer, t.id)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(
            None if t.logprob is None else {_token_text(tokenizer, i)[0]: lp for i, lp in t.top}
        )
        out["text_offset"].append(state.text_offset)
        state.text_offset += len(state.offset_decoder.decode(tokenizer.token_bytes(t.id)))
    return out


def _chat_logprobs(tokenizer: Any, tokens: list[Any]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    content = [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens]
    return {"content": content, "refusal": None}


def _usage(states: list[_ChoiceState]) -> dict[str, Any]:
    prompt = sum({s.choice.prompt_index: s.prompt_tokens for s in states}.values())
    cached = sum({s.choice.prompt_index: s.cached_tokens for s in states}.values())
    completion = sum(s.completion_tokens for s in states)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},  # OpenAI's field: the prompt the cache held
    }


def _submit(
    state: State, http: HTTPRequest, choices: list[_Choice]
) -> tuple[list[Any], list[_ChoiceState], asyncio.Queue]:
    """Queue the choices in the engine: their handles, their states, and the queue their outputs arrive on."""
    from gptmini.rows import ContextLengthExceeded, QueueFull

    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    def emitter(index: int) -> Callable[[Any], None]:
        return lambda out: loop.call_soon_threadsafe(events.put_nowait, (index, out))

    try:
        handles = state.engine.submit_many([(c.request, emitter(i)) for i, c in enumerate(choices)])
    except QueueFull as e:
        raise APIError(
            429,
            f"the server is busy: {e}; retry shortly",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except (ContextLengthExceeded, ValueError) as e:
        named = str(e).split(":", 1)[0]  # the engine names the field its message is about ("logit_bias: …")
        raise APIError(400, str(e), param=named if named in _Common.model_fields else None) from None
    states = [_ChoiceState(i, c) for i, c in enumerate(choices)]
    http.state.gptmini_choices = states  # for the access log's token counts
    return handles, states, events


async def _serve(
    state: State, http: HTTPRequest, choices: list[_Choice], body: _Common, *, chat: bool
) -> Response:
    handles, states, events = _submit(state, http, choices)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    tokenizer = state.lm.tokenizer
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(
            state, http, handles, states, events, ident, created, chat, include_usage, tokenizer, body
        )
        return _event_stream(state, stream, handles, events)
    await _gather(http, handles, states, events)
    result = []
    shown = states
    if not chat and len(states) > body.n * (1 + max(s.choice.prompt_index for s in states)):
        shown = _most_likely(states, body.n)  # best_of
    for s in shown:
        text = "".join(s.text)
        if chat:
            message, finish = _chat_message(s, text)
            entry = {
                "index": s.index,
                "message": message,
                "logprobs": _chat_logprobs(tokenizer, s.tokens)
                if s.choice.request.logprobs is not None
                else None,
                "finish_reason": finish,
            }
        else:
            logprobs = None
            if body.logprobs is not None:
                tokens = [*(s.prompt_tokens_lp or []), *s.tokens] if body.echo else s.tokens
                logprobs = _completion_logprobs(tokenizer, tokens, s)
            entry = {
                "index": s.index,
                "text": (s.choice.prompt_text if body.echo else "") + text,
                "logprobs": logprobs,
                "finish_reason": s.finish_reason,
            }
        result.append(entry)
    return JSONResponse(
        {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": state.model_id,
            "choices": result,
            "usage": _usage(states),
            "system_fingerprint": None,
        }
    )


def _chat_message(s: _ChoiceState, text: str) -> tuple[dict[str, Any], str | None]:
    """A chat choice's message and finish reason: the text, or the tool call it makes."""
    from gptmini.structured_api import tool_call

    wanted = s.choice.structure
    call = tool_call(wanted, text, s.call_id) if wanted is not None and wanted.is_call else None
    if call is None:
        return {"role": "assistant", "content": text, "refusal": None}, s.finish_reason
    finish = "tool_calls" if s.finish_reason == "stop" else s.finish_reason
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}, finish


def _take(state: _ChoiceState, out: Any) -> None:
    if out.prompt_logprobs is not None:
        state.prompt_tokens_lp = out.prompt_logprobs
    state.text.append(out.text)
    state.tokens.extend(out.tokens)
    if out.finish_reason is not None:
        state.finish_reason = "length" if out.finish_reason == "length" else "stop"
        state.completion_tokens = out.completion_tokens
        if out.stats is not None:
            state.cached_tokens = out.stats.prompt_cached
        if out.finish_reason == "error":
            state.error = out.error or "generation failed"


async def _collect(
    http: HTTPRequest, handles: list[Any], states: list[_ChoiceState], events: asyncio.Queue
) -> None:
    """Gather every choice's outputs; return early if the client leaves (the caller then cancels the handles).

    The connection is checked every quarter second even while outputs keep coming: a JSON response is written only
    at the end, so nothing else would notice the client go. (A stream needs no such watch: its response ends the
    stream when the client disconnects.)
    """
    remaining = len(states)
    next_check = time.monotonic() + 0.25
    while remaining:
        try:
            index, out = await asyncio.wait_for(events.get(), timeout=0.25)
        except TimeoutError:
            index, out = -1, None
        if time.monotonic() >= next_check:
            if await http.is_disconnected():
                return
            next_check = time.monotonic() + 0.25
        if out is None:
            continue
        _take(states[index], out)
        if out.finish_reason is not None:
            remaining -= 1


def _event_stream(
    state: State, stream: AsyncIterator[bytes], handles: list[Any], events: asyncio.Queue
) -> StreamingResponse:
    """An SSE response of `stream`, watched for a client that stops reading (see `_watched`)."""
    return StreamingResponse(
        _watched(stream, handles, events, state.settings.stall_timeout),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _gather(
    http: HTTPRequest, handles: list[Any], states: list[_ChoiceState], events: asyncio.Queue
) -> None:
    """Every choice's outputs into its state (cancelled if the client leaves); a failed generation is a 500."""
    try:
        await _collect(http, handles, states, events)
    finally:
        for h in handles:
            h.cancel()
    failed = next((s for s in states if s.error), None)
    if failed is not None:
        raise APIError(500, failed.error, type="server_error", code="generation_failed")


async def _watched(
    stream: AsyncIterator[bytes], handles: list[Any], events: asyncio.Queue, timeout: float
) -> AsyncIterator[bytes]:
    """`stream`, with its requests cancelled when its client stops reading: outputs waiting, and nothing taken for
    `timeout` seconds (a client that never reads would otherwise hold a row to `max_tokens`, every token buffered)."""
    taken = [time.monotonic()]

    async def watch() -> None:
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            if events.qsize() and time.monotonic() - taken[0] > timeout:
                log.warning(
                    "a client read nothing of its stream for %.0f s: its request is cancelled", timeout
                )
                for h in handles:
                    h.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        async for chunk in stream:
            yield chunk
            taken[0] = time.monotonic()  # the client took the chunk: the next one is asked for
    finally:
        watcher.cancel()


async def _stream(
    state: State,
    http: HTTPRequest,
    handles: list[Any],
    states: list[_ChoiceState],
    events: asyncio.Queue,
    ident: str,
    created: int,
    chat: bool,
    include_usage: bool,
    tokenizer: Any,
    body: _Common,
) -> AsyncIterator[bytes]:
    """SSE: per choice a role delta (chat), content deltas, a finish chunk; the usage chunk; `[DONE]`."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        choices: list[dict[str, Any]], usage: dict[str, int] | None = None, with_usage: bool = False
    ) -> bytes:
        data: dict[str, Any] = {
            "id": ident,
            "object": obj,
            "created": created,
            "model": state.model_id,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        return format_sse_event(data_str=json.dumps(data, ensure_ascii=False))

    def piece(s: _ChoiceState, text: str, tokens: list[Any], finish: str | None) -> dict[str, Any]:
        wants_lp = s.choice.request.logprobs is not None
        if chat:
            wanted = s.choice.structure
            if wanted is not None and wanted.is_call:
                from gptmini.structured_api import call_delta

                delta = call_delta(wanted, s, text, finish is not None)
                finish = "tool_calls" if finish == "stop" else finish
            else:
                delta = {"content": text} if text else {}
            lp = _chat_logprobs(tokenizer, tokens) if wants_lp and tokens else None
            return {"index": s.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        lp = _completion_logprobs(tokenizer, tokens, s) if wants_lp and (tokens or not finish) else None
        return {"index": s.index, "text": text, "logprobs": lp, "finish_reason": finish}

    echo = isinstance(body, CompletionBody) and body.echo
    try:
        if chat:
            for s in states:
                role = {
                    "index": s.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield chunk([role])
        started = [False] * len(states)
        remaining = len(states)
        while remaining:
            index, out = await events.get()
            s = states[index]
            _take(s, out)
            if s.error:
                error = APIError(500, s.error, type="server_error", code="generation_failed").body()
                yield format_sse_event(data_str=json.dumps(error))
                break
            text, tokens = out.text, list(out.tokens)
            if echo and not started[index]:  # the prompt comes first, with its logprobs when asked for
                text = s.choice.prompt_text + text
                tokens = [*(out.prompt_logprobs or []), *tokens]
            started[index] = True
            if text or tokens:
                p = piece(s, text, tokens, None)
                # (a call of one of several tools is sent whole, at the end: nothing before)
                if not chat or p["delta"] or p["logprobs"]:
                    yield chunk([p])
            if out.finish_reason is not None:
                remaining -= 1
                yield chunk([piece(s, "", [], s.finish_reason)])
        else:
            if include_usage:
                yield chunk([], _usage(states))
    except Exception as e:  # never end a stream without saying why
        log.exception("streaming failed")
        error = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
        yield format_sse_event(data_str=json.dumps(error))
    finally:
        for h in handles:
            h.cancel()  # a no-op for finished requests; frees the row of one whose client left
    yield format_sse_event(data_str="[DONE]")
