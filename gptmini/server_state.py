"""What every part of the server shares: its settings (`ServeSettings`), its state (`State`: the model, the engine,
the metrics), and errors in OpenAI's shape (`APIError`)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gptmini.server_metrics import Metrics

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON is far more than any context window holds


@dataclass
class ServeSettings:
    checkpoint: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    threads: int | None = None
    parallel: int = 4
    max_queue: int = 64
    api_keys: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    ui: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY
    model_name: str | None = None
    lookup: int = 0  # prompt-lookup draft tokens for requests that do not set `lookup` themselves
    stall_timeout: float = (
        30.0  # seconds a stream may leave its outputs unread before its request is cancelled
    )
    access_log: bool = True  # one line per request on stderr (`--quiet`: none)


# ---- errors ---------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_STATUS_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    503: ("server_error", "shutting_down"),
}


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, as one readable line naming the field."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(
            400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        )
    if not loc:
        return APIError(400, "the request body must be a JSON object")
    # Union types report each member's failure; the field's name and the first message are what a user needs.
    param = loc[0]
    where = ".".join(loc[:1] + [p for p in loc[1:] if p.isdigit()])
    return APIError(400, f"{where}: {err['msg']}", param=param, code="invalid_value")


class State:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.lm = None
        self.engine = None
        self.template = None
        self.model_id = settings.model_name or (
            settings.checkpoint.name if settings.checkpoint else "gptmini"
        )
        self.created = int(time.time())
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.metrics = Metrics(lambda: (self.engine.running, self.engine.waiting) if self.engine else (0, 0))
        # Set when the server begins to stop: requests still sending their body are then answered 503 at once
        # instead of holding the shutdown for the whole drain timeout.
        self.stopping = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, seen by the first request

    def begin_stopping(self) -> None:
        """Safe from any thread (uvicorn's signal handler)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)

    def model_card(self) -> dict[str, Any]:
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "gptmini"}
        if self.lm is not None:
            card["context_length"] = self.lm.config.block_size
        return card


def _require_ready(state: State) -> None:
    if not state.ready.is_set():
        raise APIError(
            503,
            "the model is still loading; retry when GET /health answers 200",
            type="server_error",
            code="loading",
            headers={"Retry-After": "1"},
        )
