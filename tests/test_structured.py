"""Structured output: text decoded under a grammar parses and validates — checked by independent means (the
`jsonschema` package, `re.fullmatch`, a naive greedy recompute that masks the model's own logits step by step) — on
the shipped models (compact vocabularies) and a GPT-2-vocabulary model; and the HTTP fields that ask for it
(`response_format`, `tools` / `tool_choice`, vLLM's `guided_*`) as the official openai client sends them."""

from __future__ import annotations

import json
import re
from typing import Literal

import numpy as np
import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
from test_serve_api import app_client, assert_error  # noqa: E402

from gptmini import grammar  # noqa: E402
from gptmini.config import SamplingConfig  # noqa: E402
from gptmini.engine import Engine  # noqa: E402
from gptmini.rows import Request  # noqa: E402

# Bounded everywhere, so every reply ends well inside max_tokens whatever a small model prefers.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "flags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module", params=["base", "chat", "gpt2"])
def any_lm(request):
    return request.getfixturevalue(f"{request.param}_lm")


# ---- the library --------------------------------------------------------------------------------------------


def test_json_schema_replies_validate_greedy_and_sampled(any_lm):
    g = grammar.json_schema(PERSON)
    for temperature, seed in [(0, None), (1.0, 1), (1.0, 2), (1.3, 3)]:
        text = any_lm.generate(
            "Who is there?", max_new_tokens=200, temperature=temperature, seed=seed, grammar=g
        )
        jsonschema.validate(json.loads(text), PERSON)


def test_any_json_object_regex_and_choice(base_lm):
    text = base_lm.generate(
        "Data:", max_new_tokens=300, temperature=0.9, seed=5, grammar=grammar.json_schema(None)
    )
    # unbounded strings may run to max_new_tokens; where the object closed, it parses
    if text.endswith("}"):
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    pattern = r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-3]\d"
    for seed in range(3):
        date = base_lm.generate(
            "Date:", max_new_tokens=20, temperature=1.0, seed=seed, grammar=grammar.regex(pattern)
        )
        assert re.fullmatch(pattern, date), date
        pick = base_lm.generate(
            "Pick:",
            max_new_tokens=5,
            temperature=1.0,
            seed=seed,
            grammar=grammar.one_of(["yes", "no", "maybe so"]),
        )
        assert pick in {"yes", "no", "maybe so"}


def test_greedy_under_a_grammar_is_the_argmax_of_the_allowed_tokens(chat_lm):
    """A naive recompute: the whole sequence through `model(...)` each step, the allowed set from a fresh matcher
    consuming the chosen tokens, argmax over the allowed logits; the engine must pick the same tokens."""
    import llguidance
    import llguidance.numpy

    lm, g = chat_lm, grammar.json_schema(WEATHER)
    ids = lm.tokenizer.encode("Weather:")
    matcher = llguidance.LLMatcher(grammar.lltokenizer(lm.tokenizer, lm.config.vocab_size), g)
    words = llguidance.numpy.allocate_token_bitmask(1, lm.config.vocab_size)
    chosen = []
    with torch.no_grad():
        while not matcher.is_stopped() and len(chosen) < 60:
            logits = lm.model(torch.tensor([ids + chosen]))[0][0, -1, : lm.config.vocab_size].float()
            llguidance.numpy.fill_next_token_bitmask(matcher, words)
            allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[: lm.config.vocab_size].astype(
                bool
            )
            tok = int(torch.where(torch.from_numpy(allowed), logits, -torch.inf).argmax())
            chosen.append(tok)
            matcher.consume_token(tok)
    text = lm.generate("Weather:", max_new_tokens=60, temperature=0, grammar=g)
    assert text == lm.tokenizer.decode([t for t in chosen if t not in lm.tokenizer.special_ids.values()])
    jsonschema.validate(json.loads(text), WEATHER)


def test_a_grammar_row_leaves_its_neighbours_alone(base_lm):
    """In one batch, a constrained row and a plain one: the plain row's greedy tokens are its tokens alone."""
    ids = base_lm.tokenizer.encode("To be, or not")
    plain = Request(
        prompt_ids=ids, sampling=SamplingConfig(temperature=0), max_new_tokens=20, ignore_eos=True
    )
    shaped = Request(
        prompt_ids=ids,
        sampling=SamplingConfig(temperature=0),
        max_new_tokens=60,
        grammar=grammar.json_schema(PERSON),
    )
    engine = Engine(base_lm, parallel=2, max_queue=0)
    alone = [t for _, out in engine.generate_many([plain]) for t in out.ids]
    together: dict[int, list[int]] = {0: [], 1: []}
    for i, out in engine.generate_many([shaped, plain]):
        together[i] += out.ids
    assert together[1] == alone
    jsonschema.validate(json.loads(base_lm.tokenizer.decode(together[0])), PERSON)


def test_unusable_grammars_say_why(base_lm):
    from gptmini.errors import UserError

    with pytest.raises(UserError, match="objekt"):
        base_lm.generate("x", grammar=grammar.json_schema({"type": "objekt"}))
    with pytest.raises(UserError, match="choices"):
        grammar.one_of([])


# ---- over HTTP ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_app(chat_lm):
    with app_client(chat_lm) as client:
        yield client


def post_chat(client, **body):
    body = {
        "messages": [{"role": "user", "content": "Weather in Paris? Add 2 and 3."}],
        "max_tokens": 120,
        **body,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_response_format_json_schema_and_json_object(chat_app):
    for seed in range(3):
        choice = post_chat(
            chat_app,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
            temperature=1.0,
            seed=seed,
        )
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    choice = post_chat(
        chat_app, response_format={"type": "json_object"}, temperature=0.8, seed=1, max_tokens=400
    )
    assert choice["message"]["content"].startswith("{")
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def stream_call(client, **body):
    """A streamed tool call put back together as a client does: id and name from the first delta, the arguments
    joined."""
    body = {
        "messages": [{"role": "user", "content": "Weather in Paris? Add 2 and 3."}],
        "max_tokens": 120,
        **body,
    }
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    call: dict = {"arguments": ""}
    finish = None
    for e in events:
        for c in e["choices"]:
            finish = c["finish_reason"] or finish
            for t in c["delta"].get("tool_calls") or []:
                if "id" in t:
                    call.update(id=t["id"], name=t["function"]["name"])
                call["arguments"] += t["function"].get("arguments") or ""
    return call, finish


@pytest.mark.parametrize(
    "tool_choice",
    [
        "required",
        {"type": "function", "function": {"name": "add"}},
        {"type": "function", "function": {"name": "get_weather"}},
    ],
)
def test_tool_calls_answer_openais_shape_streamed_or_not(chat_app, tool_choice):
    for seed in range(2):
        choice = post_chat(chat_app, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=seed)
        assert choice["finish_reason"] == "tool_calls"
        message = choice["message"]
        assert message["content"] is None and len(message["tool_calls"]) == 1
        call = message["tool_calls"][0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        if isinstance(tool_choice, dict):
            assert name == tool_choice["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[name])
        streamed, finish = stream_call(
            chat_app, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=seed
        )
        assert finish == "tool_calls"
        assert (streamed["name"], streamed["arguments"]) == (name, call["function"]["arguments"])


def test_guided_extensions_on_completions(chat_app):
    r = chat_app.post(
        "/v1/completions",
        json={"prompt": "Pick:", "guided_choice": ["yes", "no"], "max_tokens": 5, "temperature": 1.0},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in {"yes", "no"}
    r = chat_app.post(
        "/v1/completions",
        json={"prompt": "Code:", "guided_regex": r"[A-Z]{3}-\d{2}", "max_tokens": 10, "temperature": 1.0},
    )
    assert re.fullmatch(r"[A-Z]{3}-\d{2}", r.json()["choices"][0]["text"])
    r = chat_app.post(
        "/v1/completions", json={"prompt": "Add:", "guided_json": ADD, "max_tokens": 40, "temperature": 1.0}
    )
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), ADD)


def test_logit_bias_cannot_push_a_token_past_the_grammar(chat_app, chat_lm):
    """+100 on a token the grammar forbids changes nothing; +100 on an allowed one makes greedy take it."""
    maybe, no = chat_lm.tokenizer.encode("maybe")[0], chat_lm.tokenizer.encode("no")[0]
    body = {"prompt": "Pick:", "guided_choice": ["yes", "no"], "max_tokens": 5, "temperature": 0}
    r = chat_app.post("/v1/completions", json={**body, "logit_bias": {str(maybe): 100}})
    assert r.json()["choices"][0]["text"] in {"yes", "no"}
    r = chat_app.post("/v1/completions", json={**body, "logit_bias": {str(no): 100}})
    assert r.json()["choices"][0]["text"] == "no"


def test_an_agents_history_of_calls_and_results_is_accepted(chat_app):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    r = chat_app.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8})
    assert r.status_code == 200, r.text


def test_what_cannot_be_honoured_is_a_400_naming_it(chat_app):
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        ({"tools": TOOLS}, "tool_choice"),  # "auto" by default
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"guided_regex": "("}, "guided_regex"),
    ]
    for extra, param in cases:
        assert_error(chat_app.post("/v1/chat/completions", json={"messages": msgs, **extra}), 400, param)
    r = chat_app.post("/v1/completions", json={"prompt": "x", "tools": TOOLS, "tool_choice": "required"})
    assert_error(r, 400, "tools")
    # "none" leaves the tools out: plain text
    assert post_chat(chat_app, tools=TOOLS, tool_choice="none", max_tokens=4)["finish_reason"] in {
        "stop",
        "length",
    }


def test_generate_cli_structured_flags(tmp_path, capsys):
    from conftest import main_in_process

    def cli(*args):
        return main_in_process(capsys, "generate", *args, "--device", "cpu")

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    code, out, err = cli("Who:", "--json-schema", schema, "-t", "1", "--seed", "3", "--no-stream")
    assert code == 0, err
    jsonschema.validate(json.loads(out.removeprefix("Who:").strip()), PERSON)
    code, out, _ = cli("Pick:", "--choice", "yes", "--choice", "no", "-t", "1")
    assert out.strip().removeprefix("Pick:") in {"yes", "no"}
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}')
    for args, message in [
        (["--json", "--regex", "a"], "one structure at a time"),
        (["--json-schema", tmp_path / "missing.json"], "cannot read"),
        (["--json", "--lookup", "3"], "does not combine"),
        (["--json-schema", bad], "objekt"),
    ]:
        code, out, err = cli("x", *args)
        assert code == 2 and message in err and "Traceback" not in err, err


def test_request_lookup_with_a_structure_is_a_400(chat_app):
    body = {"prompt": "x", "guided_choice": ["a", "b"], "lookup": 2}
    assert_error(chat_app.post("/v1/completions", json=body), 400, "lookup")


def test_the_openai_clients_parse_helper_gets_a_validated_object(chat_app):
    """`client.chat.completions.parse(response_format=PydanticModel)`: the SDK sends a strict json_schema and parses
    the reply into the model; `pydantic` validates every bound."""
    openai = pytest.importorskip("openai")

    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=120)
        role: Literal["admin", "user", "guest"]

    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=chat_app)
    for seed in range(2):
        done = client.chat.completions.parse(
            model="m",
            messages=[{"role": "user", "content": "Describe someone."}],
            response_format=Person,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        person = done.choices[0].message.parsed
        assert (
            isinstance(person, Person)
            and Person.model_validate_json(done.choices[0].message.content) == person
        )


def test_an_open_object_schema_takes_only_its_listed_properties(base_lm):
    """Silent on other properties, JSON Schema allows any; OpenAI's strict mode (and this server) takes none, so a
    small model cannot invent keys until max_tokens. The text is still valid under the schema as given."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "properties": {"type": "boolean"}},
        "required": ["name", "properties"],
    }
    for seed in range(3):
        text = base_lm.generate(
            "Who:", max_new_tokens=80, temperature=1.0, seed=seed, grammar=grammar.json_schema(schema)
        )
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert set(value) == {"name", "properties"}


def test_langchain_structured_output_and_bound_tools(chat_app):
    """LangChain's ChatOpenAI: `with_structured_output` (json_schema and function_calling) returns a validated
    object, `bind_tools(..., tool_choice="required")` and a named tool get tool calls whose arguments validate;
    `bind_tools` with its default ("auto") is the server's clear 400, not text with tool_calls=[]."""
    langchain_openai = pytest.importorskip("langchain_openai")

    import openai
    from langchain_core.tools import tool
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        """A person."""

        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=120)

    @tool
    def get_weather(city: str, unit: Literal["c", "f"]) -> str:
        """The weather in a city."""
        return "sunny"

    llm = langchain_openai.ChatOpenAI(
        base_url="http://testserver/v1",
        api_key="none",
        model="m",
        temperature=0,
        max_tokens=100,
        http_client=chat_app,
    )
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Describe someone.")
        assert isinstance(person, Person)
    weather = WEATHER | {"properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}
    for choice in ("required", "get_weather"):
        calls = llm.bind_tools([get_weather], tool_choice=choice).invoke("Weather in Paris?").tool_calls
        assert len(calls) == 1 and calls[0]["name"] == "get_weather"
        jsonschema.validate(calls[0]["args"], weather)
    with pytest.raises(openai.BadRequestError, match="auto"):
        llm.bind_tools([get_weather]).invoke("Weather?")


def test_the_grammar_engines_encoder_spells_a_broken_character_with_its_own_bytes(base_lm, gpt2_lm):
    """llguidance asks the vocabulary to encode bytes that may end mid-character: each such byte is its byte token
    (decoding gives the bytes back), on a compact vocabulary and on GPT-2's."""
    for lm in (base_lm, gpt2_lm):
        vocabulary = grammar._Vocabulary(lm.tokenizer, lm.config.vocab_size)
        for raw in (b"caf\xc3", b"\xe9t\xe9", "naïve".encode()):
            assert lm.tokenizer.decode_bytes(vocabulary(raw)) == raw
