"""`gptmini serve` against its own OpenAPI document: schemathesis (`st run --checks all`) on a real server with
--api-key, so the document is fetched behind the key and every request carries it.

Every check runs: no 5xx, only documented statuses, content types and headers, bodies (JSON, and each SSE event of
`stream: true`) valid under the documented schemas, schema-valid requests accepted and schema-violating ones
refused, 401 without the key, 405 for undocumented methods, and the rest of schemathesis' list. All phases (the
document's examples, coverage, fuzzing, stateful), seeded and deterministic, bounded to `MAX_EXAMPLES` fuzzed
cases per route. tests/schemathesis_hooks.py narrows the generated cases where the document can only say in words
what the server takes (a prompt's length in tokens, a named tool among `tools`), and keeps `max_tokens` small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("requests")

from test_serve import CHAT_CKPT, serve

KEY = "st-key"
PARALLEL, MAX_QUEUE = 2, 8
MAX_EXAMPLES = 10  # fuzzed cases per route; the coverage phase adds its own ~2,000 boundary cases
SEED = 1
TESTS = Path(__file__).resolve().parent


@pytest.mark.slow
def test_the_server_is_true_to_its_openapi_document(tmp_path):
    args = (
        "-c",
        str(CHAT_CKPT),
        "--api-key",
        KEY,
        "--parallel",
        str(PARALLEL),
        "--max-queue",
        str(MAX_QUEUE),
    )
    with serve(*args, "--quiet") as server:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
            "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
            "GPTMINI_ST_URL": server.url,
            "GPTMINI_ST_KEY": KEY,
            "GPTMINI_ST_CAPACITY": str(PARALLEL + MAX_QUEUE),
        }
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--no-color",
            "run",
            f"{server.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--generation-deterministic",  # (and no example database)
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--max-failures",
            "5",
            "--output-truncate",
            "false",
        ]
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    failures = out[out.find("FAILURES") :] if "FAILURES" in out else out
    assert run.returncode == 0, failures[-20000:]
    assert "No issues found" in out, out[-5000:]
    # every route was exercised, in every phase
    assert "10 selected / 10 total" in out and "Tested: 10" in out, out[-5000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in out, out[-5000:]
