"""`gptmini serve`: the app — the OpenAI HTTP API over the engine, with metrics and a web chat page.

Endpoints (OpenAI's wire format, so the official `openai` client works unchanged):
  POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with `stream: true`), POST /v1/responses,
  GET /v1/models, GET /v1/models/{id}, GET /health (200 ready, 503 while loading; never needs a key), GET /metrics
  (Prometheus), GET / (the page); vLLM's POST /tokenize, POST /detokenize and GET /tokenizer_info.

The rooms: this module builds the app (loading the model on a thread, the page, CORS), guards it (the API key
before the body is read, the body limit, the access log), answers every error in OpenAI's shape (FastAPI's 422
becomes a 400) and runs it (`serve`: drain on SIGTERM). The routes are `gptmini.openai_api` (completions, chat,
models, metrics), `gptmini.responses_api`, `gptmini.tokenizer_api`; what they share is `gptmini.server_state`
(settings, state, `APIError`) and `gptmini.server_metrics`. Model logic lives in `gptmini.engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from gptmini.errors import UserError
from gptmini.openai_api import _add_openai_routes, _usage
from gptmini.responses_api import add_responses_route
from gptmini.server_state import _STATUS_TYPES, APIError, ServeSettings, State, _validation_error
from gptmini.tokenizer_api import _add_tokenizer_routes

log = logging.getLogger("gptmini.server")

PAGE = Path(__file__).parent / "assets" / "chat.html"


# ---- the app --------------------------------------------------------------------------------------------------


def create_app(
    settings: ServeSettings, *, lm: Any = None, on_load_error: Callable[[str], None] | None = None
) -> FastAPI:
    """The FastAPI app. The model loads in a background thread (GET /health says 503 until it is ready), unless a
    loaded `lm` is given, or a `Future` of one (the CLI starts loading before it imports this module)."""
    state = State(settings)

    def load() -> None:
        from gptmini.api import load as load_lm
        from gptmini.chat import template_for
        from gptmini.engine import Engine

        try:
            given = lm.result() if isinstance(lm, Future) else lm
            model = given or load_lm(
                settings.checkpoint,
                device=settings.device,
                dtype=settings.dtype,
                quantize=settings.quantize,
                threads=settings.threads,
            )
            state.template = template_for(model.config, model.tokenizer)
            state.engine = Engine(
                model, parallel=settings.parallel, max_queue=settings.max_queue, metrics=state.metrics
            ).start()
            state.lm = model
            state.ready.set()
        except Exception as e:  # reported once, then the server stops (the CLI exits 2 for a UserError)
            state.load_error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", state.load_error)
            if on_load_error is not None:
                on_load_error(state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load, name="gptmini-load", daemon=True)
        loader.start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop, 5.0)

    app = FastAPI(
        title="gptmini",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    # Outermost last: the access log sees every answer, the key is checked before the body is read.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, state=state)
    if settings.api_keys:
        app.add_middleware(APIKeyGuard, keys=settings.api_keys, state=state)
    app.state.gptmini = state
    _install_error_handlers(app, state)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if settings.access_log:
        app.add_middleware(AccessLog)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.ready.is_set():
            return JSONResponse({"status": "ok"})
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503)

    _add_openai_routes(app, state)
    add_responses_route(app, state)
    _add_tokenizer_routes(app, state)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    if settings.ui:
        page = PAGE.read_text(encoding="utf-8")

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def index() -> HTMLResponse:
            return HTMLResponse(page)

    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, true to this server (`gptmini.openapi`); kept once the model's limits are known."""
    if app.openapi_schema is None:
        from gptmini.openapi import document

        state = app.state.gptmini
        schema = document(app, state)
        if state.lm is None:
            return schema
        app.openapi_schema = schema
    return app.openapi_schema


class BodyLimit:
    """413 for a body over `limit` bytes: at once from Content-Length, else as soon as the received bytes pass it;
    503 for a body still arriving when the server begins to stop (it would otherwise hold the shutdown).

    Raised while the route reads the body, so the errors come in OpenAI's shape.
    """

    def __init__(self, app: Any, limit: int, state: State) -> None:
        self.app = app
        self.limit = limit
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        if (
            loop is not self.state.loop
        ):  # the first request (or a test client's new loop): an event bound to it
            self.state.loop, self.state.stopping = loop, asyncio.Event()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.limit
        received = 0
        body_done = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, body_done
            if body_done:  # after the body: only the disconnect a streaming response waits for
                return await receive()
            if too_large:
                raise HTTPException(413)
            message = await self._receive_unless_stopping(receive)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413)
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)

    async def _receive_unless_stopping(self, receive: Callable) -> dict[str, Any]:
        stopping = self.state.stopping
        if not stopping.is_set():
            message = asyncio.ensure_future(receive())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait((message, stop), return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if message.done():
                return message.result()
            message.cancel()
        # An HTTPException: FastAPI turns any other error raised while it reads the body into a 400.
        raise HTTPException(503, "the server is shutting down", headers={"Connection": "close"})


class APIKeyGuard:
    """401 for a request without a valid key, before its body is read; /health never needs one."""

    def __init__(self, app: Any, keys: list[str], state: State) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = _presented_key(headers.get(b"authorization", b"").decode("latin-1")).encode()
        # compare_digest with every key: the time taken says nothing about how much of a key matched
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        if ok:
            return await self.app(scope, receive, send)
        self.state.metrics.rejected.labels("unauthorized").inc()
        # Basic lets a browser ask for the key (any user name, the key as password) to open the page
        error = APIError(
            401,
            "missing API key: send 'Authorization: Bearer KEY'" if not given else "invalid API key",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer, Basic realm="gptmini"'},
        )
        await error.response()(scope, receive, send)


class AccessLog:
    """One line per request on stderr when its answer is complete: time, client, method, path, status, tokens
    (prompt+completion, for generation routes), milliseconds."""

    def __init__(self, app: Any, write: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 0
        request_state = scope.setdefault("state", {})

        async def logged_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            choices = request_state.get("gptmini_choices")
            usage = _usage(choices) if choices else None
            tokens = f" tokens={usage['prompt_tokens']}+{usage['completion_tokens']}" if usage else ""
            client = scope.get("client") or ("-", 0)
            ms = (time.perf_counter() - t0) * 1000
            when = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.write(
                f"{when} {client[0]} {scope['method']} {scope['path']} {status or '-'}{tokens} {ms:.0f}ms"
            )


def _install_error_handlers(app: FastAPI, state: State) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        if exc.status == 429:
            state.metrics.rejected.labels("queue_full").inc()
        elif exc.status in (400, 413):
            state.metrics.rejected.labels("invalid_request").inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        state.metrics.rejected.labels("invalid_request").inc()
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
        kind, code = _STATUS_TYPES.get(exc.status_code, ("invalid_request_error", None))
        messages = {
            404: f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, "
            "POST /v1/chat/completions",
            413: f"the request body is larger than {state.settings.max_body_bytes} bytes",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        if exc.status_code == 413:
            state.metrics.rejected.labels("invalid_request").inc()
        message = messages.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message, type=kind, code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def crashed(request: HTTPRequest, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()


def _presented_key(header: str) -> str:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        import base64
        import binascii

        try:
            return base64.b64decode(value.strip()).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


# ---- running it -----------------------------------------------------------------------------------------------


def serve(
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float = 30.0,
    announce: Callable[[str], None] = print,
    lm: Any = None,
) -> int:
    """Run the server until Ctrl-C / SIGTERM, then drain in-flight requests for up to `drain_timeout` seconds.

    `lm`: as for `create_app`. Returns the exit code: 0 after a clean stop, 2 when the model could not be loaded.
    """
    import uvicorn

    failure: list[str] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a signal means "stop": exit 0 after draining, not die by it
            app.state.gptmini.begin_stopping()  # bodies still arriving get a 503 now, not the drain timeout

    def load_failed(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(settings, lm=lm, on_load_error=load_failed)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=drain_timeout,
        lifespan="on",
    )
    server = Server(config)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    announce(f"gptmini serve: {url}  (web chat at {url}/)" if settings.ui else f"gptmini serve: {url}")
    key = " -H 'Authorization: Bearer $KEY'" if settings.api_keys else ""
    announce(
        f"try: curl {url}/v1/completions -H 'Content-Type: application/json'{key} "
        """-d '{"prompt": "To be, or not", "max_tokens": 20}'"""
    )
    server.run()
    if failure:
        raise UserError(failure[0])
    return 0
