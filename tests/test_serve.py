"""`gptmini serve`, driven as a client would: the real server process on a loopback port, the official `openai`
client (sync and async) and raw HTTP. References are independent of the server: the library's own generation
(`lm.generate`, `ChatSession`), the model's log-softmax, and the same requests sent one at a time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import gptmini  # noqa: E402
from gptmini.chat import ChatSession, ChatSettings  # noqa: E402
from gptmini.tokenizer import CHAT_TOKENS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHAT_CKPT = ROOT / "checkpoints" / "default-chat"
BASE_CKPT = ROOT / "checkpoints" / "default"
TIMEOUT = 120  # seconds any one server command or request may take before the test fails instead of hanging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `gptmini serve` process."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw
        )

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def metrics(self, **headers) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@contextmanager
def serve(*args: str, env: dict[str, str] | None = None):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gptmini",
        "serve",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--port",
        str(port),
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gptmini serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("gptmini serve did not become ready")
            time.sleep(0.1)
        yield Server(proc, url)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        proc.stdout.close()


@pytest.fixture(scope="module")
def server():
    with serve("-c", str(CHAT_CKPT), "--parallel", "8") as s:
        yield s


@pytest.fixture(scope="module")
def lm():
    return gptmini.load(CHAT_CKPT, device="cpu")


def model_id(server: Server) -> str:
    return server.client().models.list().data[0].id


# ---- the API as the openai client sees it ----------------------------------------------------------------------


def test_health_and_models(server):
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    models = server.client().models.list().data
    assert [m.id for m in models] == ["default-chat"]


def test_greedy_completion_equals_the_library(server, lm):
    prompt = "To be, or not to be"
    got = server.client().completions.create(
        model="default-chat", prompt=prompt, max_tokens=24, temperature=0
    )
    # a chat model's completion ends at its control tokens, as at <|endoftext|>
    ref = lm.generate(prompt, temperature=0, max_new_tokens=24, stop=list(CHAT_TOKENS))
    assert got.choices[0].text == ref
    assert got.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
    assert got.usage.completion_tokens <= 24
    assert got.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_chat_template(server, lm):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who goes there?"},
    ]
    got = server.client().chat.completions.create(
        model="default-chat", messages=messages, temperature=0, max_tokens=30
    )
    session = ChatSession(
        lm, settings=ChatSettings(temperature=0, max_new_tokens=30), system="Answer briefly."
    )
    ref = "".join(session.respond("Who goes there?"))
    assert got.choices[0].message.content == ref
    assert got.choices[0].message.role == "assistant"
    # max_completion_tokens is the same limit under its newer name
    alias = server.client().chat.completions.create(
        model="default-chat", messages=messages, temperature=0, max_completion_tokens=30
    )
    assert alias.choices[0].message.content == ref


def test_stream_equals_non_stream_with_usage(server):
    client = server.client()
    prompt = "ROMEO. What light"
    full = client.completions.create(
        model="m", prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.completions.create(
            model="m",
            prompt=prompt,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_stream_role_deltas_and_usage(server):
    client = server.client()
    messages = [{"role": "user", "content": "What news from the court?"}]
    full = client.chat.completions.create(model="m", messages=messages, max_tokens=30, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=messages,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n_choices_and_seed_reproducibility(server):
    client = server.client()
    kw = dict(
        model="m", prompt="Good morrow", max_tokens=20, temperature=1.0, n=3, extra_body={"ignore_eos": True}
    )
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    c = client.completions.create(seed=8, **kw)
    texts = [ch.text for ch in sorted(a.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in sorted(a.choices, key=lambda ch: ch.index)] == [0, 1, 2]
    assert texts == [ch.text for ch in sorted(b.choices, key=lambda ch: ch.index)]
    assert texts != [ch.text for ch in sorted(c.choices, key=lambda ch: ch.index)]
    assert len(set(texts)) > 1  # each choice draws its own text
    assert a.usage.completion_tokens == 60 and a.usage.prompt_tokens == b.usage.prompt_tokens


def test_stop_strings(server, lm):
    prompt = "To be, or not"
    ref = lm.generate(prompt, temperature=0, max_new_tokens=60, ignore_eos=True)
    assert "," in ref
    got = server.client().completions.create(
        model="m",
        prompt=prompt,
        max_tokens=60,
        temperature=0,
        stop=[",", "zzz"],
        extra_body={"ignore_eos": True},
    )
    assert got.choices[0].text == ref[: ref.index(",")]
    assert got.choices[0].finish_reason == "stop"


def test_echo_and_logprobs_match_the_model(server, lm):
    prompt = "Now is the winter"
    got = server.client().completions.create(
        model="m",
        prompt=prompt,
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    choice = got.choices[0]
    assert choice.text.startswith(prompt)
    ids = lm.tokenizer.encode(choice.text)
    lp = choice.logprobs
    n_prompt = len(lm.tokenizer.encode(prompt))
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(torch.tensor([ids]))[0][0].float(), dim=-1)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < 1e-3
        best = ref[i - 1].topk(2)
        want = {
            lm.tokenizer.decode([t]): v
            for t, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)
        }
        assert set(lp.top_logprobs[i]) == set(want)
    # greedy: each generated token is the most likely one
    for i in range(n_prompt, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-6)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # lm-eval's scoring call: echo with max_tokens 0 scores the prompt alone
    score = server.client().completions.create(model="m", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert score.choices[0].text == prompt
    assert score.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1:n_prompt], abs=1e-5
    )


def test_chat_logprobs(server):
    got = server.client().chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Hail!"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = got.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6) for t in content)  # greedy
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content).startswith(
        got.choices[0].message.content[:1]
    )


def test_concurrent_requests_equal_sequential_and_batch(server):
    prompts = [
        "To be",
        "ROMEO.",
        "What light through yonder window breaks? It is the east",
        "Now is the winter of our discontent",
        "O",
        "Friends, Romans, countrymen, lend me your ears;",
        "The quality of mercy",
        "All the world's a stage, and all the men and women merely players",
    ]
    lengths = [12, 40, 25, 60, 8, 33, 50, 20]

    async def one(client, prompt, n):
        r = await client.completions.create(
            model="m", prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.choices[0].text

    async def run():
        client = server.async_client()
        sequential = [await one(client, p, n) for p, n in zip(prompts, lengths, strict=True)]
        before = server.metrics()
        concurrent = await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths, strict=True)))
        return sequential, list(concurrent), before

    sequential, concurrent, before = asyncio.run(run())
    assert concurrent == sequential
    after = server.metrics()
    steps = after["gptmini_decode_batch_size_count"] - before["gptmini_decode_batch_size_count"]
    rows = after["gptmini_decode_batch_size_sum"] - before["gptmini_decode_batch_size_sum"]
    assert rows / steps > 1.5  # more than one request decoded at once
    assert (
        after['gptmini_decode_batch_size_bucket{le="1.0"}']
        - before['gptmini_decode_batch_size_bucket{le="1.0"}']
        < steps
    )


def test_lookup_decodes_the_same_text_and_counts_its_drafts(server, lm):
    """Prompt-lookup decoding (`lookup`, an extension) over HTTP: greedy text and logprobs equal plain decoding's,
    alone and batched beside plain requests, past the window too; its drafts show in /metrics."""
    verse = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
    prompts = [verse * 3, "ROMEO.\nO Juliet, Juliet, Juliet, Juliet,", verse * 2 + "To be, or"]
    lengths = [40, 30, 300]  # 300 new tokens slide the 256-token window

    async def one(client, prompt, n, lookup):
        r = await client.completions.create(
            model="m", prompt=prompt, max_tokens=n, temperature=0, logprobs=2,
            extra_body={"ignore_eos": True, "lookup": lookup},
        )  # fmt: skip
        c = r.choices[0]
        return c.text, c.logprobs.token_logprobs, r.usage.completion_tokens

    async def run():
        client = server.async_client()
        plain = [await one(client, p, n, 0) for p, n in zip(prompts, lengths, strict=True)]
        before = server.metrics()
        looked = [await one(client, p, n, 8) for p, n in zip(prompts, lengths, strict=True)]
        middle = server.metrics()
        mixed = await asyncio.gather(
            *(
                one(client, p, n, 8 * (i % 2))
                for i, (p, n) in enumerate(zip(prompts * 2, lengths * 2, strict=True))
            )
        )
        return plain, looked, list(mixed), before, middle

    plain, looked, mixed, before, middle = asyncio.run(run())
    for (text, logprobs, used), (ref_text, ref_logprobs, ref_used) in zip(looked, plain, strict=True):
        assert text == ref_text and used == ref_used
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-4)
    assert [m[0] for m in mixed] == [p[0] for p in plain * 2]
    drafted = middle["gptmini_lookup_draft_tokens_total"] - before["gptmini_lookup_draft_tokens_total"]
    kept = middle["gptmini_lookup_accepted_tokens_total"] - before["gptmini_lookup_accepted_tokens_total"]
    assert drafted > 0 and 0 < kept <= drafted
    assert plain[0][0] == lm.generate(prompts[0], temperature=0, max_new_tokens=40, ignore_eos=True)


def test_async_streaming(server):
    async def run():
        client = server.async_client()
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Speak."}],
            max_tokens=20,
            temperature=0,
            stream=True,
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        full = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Speak."}], max_tokens=20, temperature=0
        )
        return "".join(parts), full.choices[0].message.content

    streamed, full = asyncio.run(run())
    assert streamed == full


def test_temperature_zero_is_greedy_not_a_default(server, lm):
    """(litgpt turns 0 into 0.8.) Sampled twice at temperature 0 with different seeds: the same greedy text."""
    client = server.client()
    kw = dict(model="m", prompt="Hark", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    a, b = client.completions.create(seed=1, **kw), client.completions.create(seed=2, **kw)
    assert (
        a.choices[0].text
        == b.choices[0].text
        == lm.generate("Hark", temperature=0, max_new_tokens=30, ignore_eos=True)
    )


# ---- raw HTTP ------------------------------------------------------------------------------------------------


def sse_events(server: Server, path: str, body: dict) -> tuple[httpx.Response, str]:
    with httpx.stream("POST", server.url + path, json=body, timeout=TIMEOUT) as r:
        raw = "".join(r.iter_text())
    return r, raw


def test_sse_framing(server):
    r, raw = sse_events(server, "/v1/completions", {"prompt": "Hark", "max_tokens": 10, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)  # one data line per event
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)


def test_stop_string_split_across_tokens_never_reaches_the_client(server, lm):
    prompt = "To be, or not"
    ids = lm.tokenizer.encode(prompt)
    ref_ids = []
    from gptmini.generation import generate_tokens

    sampling = gptmini.api.sampling_config(temperature=0)
    for (tok,) in generate_tokens(lm.model, ids, max_new_tokens=60, sampling=sampling):
        ref_ids.append(tok)
    tokens = [lm.tokenizer.decode([t]) for t in ref_ids]
    text = "".join(tokens)
    # a stop string made of the end of one token and the start of the next, where both are at least 2 long
    boundary = next(
        i for i in range(5, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1].strip()) >= 2
    )
    stop = tokens[boundary][-2:] + tokens[boundary + 1][:2]
    cut = text.index(stop)
    _, raw = sse_events(
        server,
        "/v1/completions",
        {
            "prompt": prompt,
            "max_tokens": 60,
            "temperature": 0,
            "stream": True,
            "stop": stop,
            "ignore_eos": True,
        },
    )
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n")[:-1] if e != "data: [DONE]"]
    streamed = [c["choices"][0]["text"] for c in chunks]
    assert "".join(streamed) == text[:cut]
    assert stop not in "".join(streamed) and not any(stop in s for s in streamed)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def unicode_checkpoint(tmp_path_factory):
    """A tiny model that has memorised a line of Chinese and emoji (many of whose characters span tokens)."""
    root = tmp_path_factory.mktemp("unicode")
    corpus = root / "zh.txt"
    corpus.write_text("你好，世界！🙂 我们一起学习语言模型。🚀✨\n" * 400, encoding="utf-8")
    os.environ.setdefault("GPTMINI_CACHE_DIR", str(root / "cache"))
    result = gptmini.train(
        [corpus],
        preset="tiny",
        out=root / "run",
        config=dict(max_iters=150, device="cpu", dtype="float32", eval_interval=1000, log_interval=1000),
    )
    return Path(result.out)


def test_chinese_and_emoji_arrive_whole(unicode_checkpoint):
    with serve("-c", str(unicode_checkpoint), "--parallel", "2") as s:
        # stopped before the last emoji, so no character is cut by the token limit
        body = {"prompt": "你好", "max_tokens": 60, "temperature": 0, "stream": True, "stop": "✨"}
        _, raw = sse_events(s, "/v1/completions", body)
        pieces = [
            json.loads(e[6:])["choices"][0]["text"] for e in raw.split("\n\n")[:-1] if e != "data: [DONE]"
        ]
        full = s.client().completions.create(
            model="m", prompt="你好", max_tokens=60, temperature=0, stop="✨"
        )
    full = full.choices[0].text
    streamed = "".join(pieces)
    assert "\ufffd" not in streamed and not any("\ufffd" in p for p in pieces)
    assert streamed == full
    assert "世界" in streamed and "🚀" in streamed  # the memorised line, multi-token characters included


# ---- faults ----------------------------------------------------------------------------------------------------


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_disconnect_frees_the_row(server):
    before = server.metrics()["gptmini_requests_cancelled_total"]
    body = {"prompt": "To be", "max_tokens": 5000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert server.metrics()["gptmini_requests_running"] == 1
    # the client is gone: its row is free within a step
    assert wait_for(lambda: server.metrics()["gptmini_requests_running"] == 0, 1.0)
    assert server.metrics()["gptmini_requests_cancelled_total"] == before + 1


def test_disconnect_of_a_non_streaming_request_frees_the_row(server):
    body = {"prompt": "To be", "max_tokens": 5000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
    assert wait_for(lambda: server.metrics()["gptmini_requests_running"] == 0, 2.0)


@pytest.fixture(scope="module")
def small_server():
    """One row, no queue, two API keys: for 429 and 401."""
    with serve(
        "-c", str(BASE_CKPT), "--parallel", "1", "--max-queue", "0", "--api-key", "k1", "--api-key", "k2"
    ) as s:
        yield s


def test_queue_full_is_429_with_retry_after(small_server):
    auth = {"Authorization": "Bearer k1"}
    body = {"prompt": "To be", "max_tokens": 5000, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", small_server.url + "/v1/completions", json=body, headers=auth, timeout=TIMEOUT
    ) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the connection
        next(line for line in lines if line.startswith("data: "))
        busy = httpx.post(
            small_server.url + "/v1/completions", json={"prompt": "x"}, headers=auth, timeout=10
        )
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
    assert wait_for(lambda: small_server.metrics(**auth)["gptmini_requests_running"] == 0, 1.0)
    ok = httpx.post(
        small_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth, timeout=10
    )
    assert ok.status_code == 200
    assert small_server.metrics(**auth)['gptmini_requests_rejected_total{reason="queue_full"}'] >= 1


def test_api_keys(small_server):
    url = small_server.url
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # never guarded
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}):
        r = httpx.get(url + "/v1/models", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(url + "/", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        small_server.client(api_key="wrong").models.list()
    assert small_server.client(api_key="k2").models.list().data[0].id == "default"
    assert httpx.get(url + "/", auth=("any", "k1"), timeout=10).status_code == 200  # a browser's Basic prompt


def test_api_key_from_the_environment():
    with serve("-c", str(BASE_CKPT), "--parallel", "1", env={"GPTMINI_API_KEY": "secret"}) as s:
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 401
        assert (
            httpx.get(
                s.url + "/v1/models", headers={"Authorization": "Bearer secret"}, timeout=10
            ).status_code
            == 200
        )


LONG_PROMPT = "word " * 600  # > 256 tokens, the shipped models' context

BAD_REQUESTS = [
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [str(i) for i in range(17)]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "lookup": -1}, 400, "lookup"),
    ("/v1/completions", {"prompt": "x", "lookup": 65}, 400, "lookup"),
    ("/v1/completions", {"prompt": [99999999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    r = httpx.post(server.url + path, json=body, timeout=TIMEOUT)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    good = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=TIMEOUT)
    assert good.status_code == 200


def test_context_length_error_names_both_numbers(server, lm):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": LONG_PROMPT}, timeout=TIMEOUT)
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    n_tokens = len(lm.tokenizer.encode(LONG_PROMPT))
    assert f"{lm.config.block_size} tokens" in error["message"] and f"{n_tokens} tokens" in error["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="m", prompt=LONG_PROMPT)


def test_malformed_json_oversized_body_unknown_route(server):
    url = server.url
    bad = httpx.post(
        url + "/v1/completions",
        content=b'{"prompt": ',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    huge = httpx.post(url + "/v1/completions", json={"prompt": "x" * (2 << 20)}, timeout=30)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    missing = httpx.get(url + "/v1/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.delete(url + "/v1/models", timeout=10).status_code == 405
    assert (
        httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10).status_code
        == 200
    )


def test_error_mid_stream_is_an_event_then_done(tmp_path, monkeypatch):
    """A model that fails after a few steps: the stream says so in an SSE error event, then [DONE]; the next
    request is served. (In-process server on a loopback port, so the fault can be planted.)"""
    import threading

    import uvicorn

    import gptmini.steps
    from gptmini.server import ServeSettings, create_app

    # Every step through PyTorch's forward, where the fault is planted (not the native step).
    monkeypatch.setattr(gptmini.steps.DecodeStep, "for_model", classmethod(lambda cls, *a: None))

    lm = gptmini.load(BASE_CKPT, device="cpu")
    real_step, calls = lm.model.forward, {"n": 0}

    def flaky_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("planted fault")
        return real_step(*args, **kwargs)

    lm.model.forward = flaky_step
    port = free_port()
    app = create_app(ServeSettings(checkpoint=BASE_CKPT, parallel=2), lm=lm)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _ready(url), 30)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        body = {"prompt": "To be", "max_tokens": 50, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            raw = "".join(r.iter_text())
        events = raw.split("\n\n")[:-1]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["message"].endswith("planted fault")
        # the openai client raises it instead of silently dropping it
        calls["n"] = 0
        with pytest.raises(openai.APIError, match="planted fault"):
            list(client.completions.create(model="m", prompt="To be", max_tokens=50, stream=True))
        ok = client.completions.create(model="m", prompt="To be", max_tokens=3)
        assert ok.choices[0].finish_reason == "length"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_drains_in_flight_requests_then_exits_0():
    with serve("-c", str(BASE_CKPT), "--parallel", "2") as s:
        body = {"prompt": "To be", "max_tokens": 120, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(timeout=30) == 0


def test_cli_mistakes_are_one_line_errors(tmp_path):
    cases = [
        (["-c", str(tmp_path / "missing")], "missing"),
        (["--parallel", "0"], "--parallel"),
        (["--quantize", "int3"], "int3"),
        (["--lookup", "65"], "lookup"),
    ]
    for args, word in cases:
        r = subprocess.run(
            [sys.executable, "-m", "gptmini", "serve", "--device", "cpu", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "gptmini", "serve", "--device", "cpu", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    assert r.returncode == 2 and "--port" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- soak ----------------------------------------------------------------------------------------------------


def test_soak_500_requests_with_early_disconnects(server):
    """500 requests, every fifth dropped after its first token: no errors, no rows left, memory flat."""

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {
            "prompt": f"Line {i}: To be",
            "max_tokens": 6 + i % 7,
            "stream": True,
            "temperature": 0.8,
            "seed": i,
        }
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if i % 5 == 0 and line.startswith("data: {"):
                    return "dropped"  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    return "done"
                assert '"error"' not in line
        return "unterminated"

    async def batch(start: int, stop: int) -> list[str]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            sem = asyncio.Semaphore(8)

            async def limited(i):
                async with sem:
                    return await one(client, i)

            return await asyncio.gather(*(limited(i) for i in range(start, stop)))

    first = asyncio.run(batch(0, 50))
    rss_after_50 = server.rss_bytes()
    rest = asyncio.run(batch(50, 500))
    outcomes = first + rest
    assert outcomes.count("unterminated") == 0
    assert outcomes.count("dropped") == 100 and outcomes.count("done") == 400
    assert wait_for(lambda: server.metrics()["gptmini_requests_running"] == 0, 2.0)
    assert server.metrics()["gptmini_requests_waiting"] == 0
    assert server.rss_bytes() <= 1.1 * rss_after_50
    assert (
        httpx.post(
            server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10
        ).status_code
        == 200
    )


def test_memory_per_slot_is_reported(lm):
    from gptmini.engine import Engine

    engine = Engine(lm, parallel=3)
    c = lm.config
    assert engine.cache_bytes_per_slot() == 2 * c.n_layer * c.block_size * c.n_embd * 4


def test_health_is_503_while_the_model_loads(monkeypatch):
    """The server answers at once; until the model is loaded /health says 503 and requests get a 503 error."""
    import threading

    import uvicorn

    import gptmini.api
    from gptmini.server import ServeSettings, create_app

    release = threading.Event()
    real_load = gptmini.api.load

    def slow_load(*args, **kwargs):
        release.wait(timeout=60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(gptmini.api, "load", slow_load)
    port = free_port()
    app = create_app(ServeSettings(checkpoint=BASE_CKPT, device="cpu", parallel=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _answers(url), 30)
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        early = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5)
        assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
        release.set()
        assert wait_for(lambda: _ready(url), 60)
        ok = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=30)


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
        return True
    except httpx.HTTPError:
        return False


def test_a_chat_that_re_sends_its_history_finds_it_cached(server):
    client = server.client()
    history = [{"role": "user", "content": "Good morrow, sir. How dost thou this fine day?"}]
    first = client.chat.completions.create(model="m", messages=history, max_tokens=12, temperature=0)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And thy brother?"},
    ]
    second = client.chat.completions.create(model="m", messages=history, max_tokens=12, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens


def test_logit_bias_and_penalties_are_applied(server, lm):
    (the,) = lm.tokenizer.encode(" the")
    client = server.client()
    forced = client.completions.create(
        model="m", prompt="To be", max_tokens=4, temperature=0, logit_bias={str(the): 100}
    )
    assert forced.choices[0].text == " the" * 4
    long = {
        "model": "m",
        "prompt": "To be",
        "max_tokens": 40,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    plain = client.completions.create(**long)
    penalised = client.completions.create(**long, frequency_penalty=2.0, presence_penalty=2.0)
    expected = lm.generate(
        "To be",
        max_new_tokens=40,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=2.0,
        ignore_eos=True,
    )
    assert penalised.choices[0].text == expected != plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="m", prompt="x", max_tokens=1, logit_bias={"999999": 1})


def test_responses_api_with_the_openai_client(server, lm):
    """`/v1/responses`: the official client's create and stream get the chat endpoint's text for the same
    conversation, with OpenAI's event order; a cut reply is incomplete; tools are refused by name."""
    client = server.client()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Good morrow, sir."},
    ]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
    made = client.responses.create(
        model="m", instructions="Be brief.", input="Good morrow, sir.", max_output_tokens=24, temperature=0
    )
    assert made.output_text == chat.choices[0].message.content
    assert made.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert made.usage.input_tokens == chat.usage.prompt_tokens
    assert made.usage.output_tokens == chat.usage.completion_tokens
    parts = [{"role": "user", "content": [{"type": "input_text", "text": "Good morrow, sir."}]}]
    with client.responses.stream(
        model="m", instructions="Be brief.", input=parts, max_output_tokens=24, temperature=0
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == made.output_text
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete" if made.status == "incomplete" else "response.completed",
    ]
    cut = client.responses.create(model="m", input="Speak at length.", max_output_tokens=2, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.responses.create(model="m", input="x", tools=[tool])
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="m", input="x", previous_response_id="resp_1")


def test_a_client_that_stops_reading_is_cancelled_after_the_stall_timeout():
    """A stream whose client reads nothing (a small receive buffer, never read) loses its row after
    --stall-timeout, while its socket is still open; a reading client on the same server is untouched."""
    import socket as socketlib

    with serve("-c", str(BASE_CKPT), "--parallel", "2", "--stall-timeout", "1") as s:
        port = int(s.url.rsplit(":", 1)[1])
        body = json.dumps(
            {"prompt": "To be", "max_tokens": 30000, "stream": True, "ignore_eos": True, "temperature": 0}
        ).encode()
        sock = socketlib.socket()
        sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        try:
            assert wait_for(lambda: s.metrics().get("gptmini_requests_running", 0) == 1, 30)
            assert wait_for(lambda: s.metrics().get("gptmini_requests_running", 0) == 0, 60)
            # cancelled, not run to its 30,000 tokens
            assert s.metrics().get("gptmini_requests_cancelled_total", 0) == 1
            ok = s.client().completions.create(model="m", prompt="x", max_tokens=3)
            assert ok.choices[0].finish_reason == "length"
        finally:
            sock.close()
