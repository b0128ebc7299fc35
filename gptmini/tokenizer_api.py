"""vLLM's tokenizer endpoints — `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info` — with llama.cpp's field
names accepted too (what lm-eval's `tokenizer_backend=remote` calls)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, field_validator

from gptmini.openai_api import _chat_messages, _encode_prompt, whole_numbers
from gptmini.server_state import APIError, State, _require_ready
from gptmini.tokenizer import byte_level


class TokenizeBody(BaseModel):
    """vLLM's /tokenize (`prompt`, or chat `messages`), or llama.cpp's (`content`)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp
    messages: list[Any] | None = None
    add_special_tokens: bool = True  # GPT-2 adds no BOS/EOS: accepted, changes nothing
    add_special: bool = True  # llama.cpp's name for it
    add_generation_prompt: bool = True  # chat: end with the assistant's turn opening
    return_token_strs: bool = False  # vLLM: each token as Hugging Face spells it ("Ġworld")
    with_pieces: bool = False  # llama.cpp: tokens as [{"id", "piece"}]


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    _whole = field_validator("tokens", mode="before")(whole_numbers)
    model: str | None = None
    tokens: list[int]


def _add_tokenizer_routes(app: FastAPI, state: State) -> None:
    """vLLM's tokenizer endpoints (what lm-eval's `tokenizer_backend=remote` calls), with llama.cpp's field names
    accepted too. A text is encoded as a completions prompt is, messages as the chat endpoint encodes them."""

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict[str, Any]:
        _require_ready(state)
        tokenizer = state.lm.tokenizer
        given = [name for name in ("prompt", "content", "messages") if getattr(body, name) is not None]
        if len(given) != 1:
            raise APIError(400, "send exactly one of prompt (or content) and messages", param="prompt")
        if body.messages is not None:
            messages = _chat_messages(body.messages)
            ids = state.template.encode(tokenizer, messages, reply=body.add_generation_prompt)
        else:
            ids = _encode_prompt(tokenizer, body.prompt if body.prompt is not None else body.content)
        out: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": state.lm.config.block_size,
            "tokens": ids,
            "token_strs": [byte_level(tokenizer.token_bytes(i)) for i in ids]
            if body.return_token_strs
            else None,
        }
        if body.with_pieces:
            out["tokens"] = [{"id": i, "piece": _piece(tokenizer.token_bytes(i))} for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict[str, Any]:
        _require_ready(state)
        vocab = state.lm.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"tokens: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens"
            )
        text = state.lm.tokenizer.decode(body.tokens)
        return {"prompt": text, "content": text}  # vLLM's name, llama.cpp's

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        from gptmini.tokenizer import EOT

        _require_ready(state)
        # As Hugging Face's tokenizer_config.json for GPT-2 (vLLM returns that file's fields), plus the vocabulary's
        # size: a compact-vocabulary model numbers its tokens its own way.
        return {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": EOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "pad_token": None,
            "add_bos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": state.lm.config.block_size,
            "vocab_size": state.lm.config.vocab_size,
            "eos_token_id": state.lm.tokenizer.eot_id,
        }


def _piece(raw: bytes) -> str | list[int]:
    """llama.cpp's `piece`: the token's text, or its bytes when they are not whole UTF-8 characters."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)
