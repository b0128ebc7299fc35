"""`gptmini serve` start-up: what it imports before it is ready, and that /health says 200 only once the model the
CLI began loading early can serve. (Speed itself is measured by `scripts/bench_startup.py`, not asserted here.)"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import gptmini  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_CKPT = ROOT / "checkpoints" / "default"
TIMEOUT = 120  # seconds before a test fails instead of hanging

# Modules a ready server must not have imported: nothing in them serves a request, and each costs start-up time.
NOT_AT_SERVE_TIME = (
    "transformers",
    "matplotlib",
    "rich",
    "sympy",
    "torch._dynamo",
    "torch._inductor",
    "gptmini.train",
    "gptmini.data",
    "gptmini.inspect",
    "gptmini.finetune",
)

# Runs `gptmini serve` in this process; a watcher thread prints the heavy modules loaded once /health is 200.
WATCH = """
import http.client, json, os, sys, threading, time

port, heavy = int(sys.argv[1]), json.loads(sys.argv[2])

def watch():
    deadline = time.monotonic() + {timeout}
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                print("LOADED " + json.dumps([m for m in heavy if m in sys.modules]), flush=True)
                os._exit(0)
        except OSError:
            pass
        time.sleep(0.05)
    os._exit(3)

threading.Thread(target=watch, daemon=True).start()
from gptmini.cli import main
main(["serve", "-c", sys.argv[3], "--port", str(port), "--device", "cpu"])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ready_server_has_not_imported_what_no_request_needs():
    code = WATCH.format(timeout=TIMEOUT)
    args = [str(free_port()), json.dumps(NOT_AT_SERVE_TIME), str(BASE_CKPT)]
    r = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=TIMEOUT + 30
    )
    loaded = [line for line in r.stdout.splitlines() if line.startswith("LOADED ")]
    assert r.returncode == 0 and loaded, r.stdout + r.stderr
    assert json.loads(loaded[0].removeprefix("LOADED ")) == []


def test_weights_that_fail_after_the_socket_opened_exit_2(tmp_path):
    """The pre-flight reads only config.json; damaged weights fail in the early load, and the server exits 2."""
    ckpt = tmp_path / "damaged"
    shutil.copytree(BASE_CKPT, ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptmini",
            "serve",
            "--device",
            "cpu",
            "-c",
            str(ckpt),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "truncated or corrupt" in r.stderr


def _status(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def _until(predicate, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _run_app(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{port}"


def test_health_waits_for_the_early_load_then_serves():
    """A model still loading in the CLI's Future: 503, then 200 once it is there, and a request is answered."""
    from gptmini.server import ServeSettings, create_app

    pending: Future = Future()
    app = create_app(ServeSettings(checkpoint=BASE_CKPT, device="cpu", parallel=1), lm=pending)
    server, thread, url = _run_app(app)
    try:
        assert _until(lambda: _status(url) is not None)
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "loading"}
        pending.set_result(gptmini.load(BASE_CKPT, device="cpu"))
        assert _until(lambda: _status(url) == 200)
        body = {"prompt": "To be", "max_tokens": 3, "temperature": 0}
        ok = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    finally:
        if not pending.done():
            pending.set_exception(RuntimeError("test ended"))
        server.should_exit = True
        thread.join(timeout=30)


def test_a_failed_early_load_is_reported_once():
    from gptmini.errors import UserError
    from gptmini.server import ServeSettings, create_app

    failed: Future = Future()
    failed.set_exception(UserError("weights.safetensors is truncated"))
    errors: list[str] = []
    app = create_app(
        ServeSettings(checkpoint=BASE_CKPT, device="cpu"), lm=failed, on_load_error=errors.append
    )
    server, thread, url = _run_app(app)
    try:
        assert _until(lambda: bool(errors))
        assert errors == ["weights.safetensors is truncated"]
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "error"}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
