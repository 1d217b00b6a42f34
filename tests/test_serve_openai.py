"""OpenAI conformance: the running app (tests/test_serve.py's server fixture, on 127.0.0.1)
driven by the official `openai` Python client, as a user's unmodified code would be."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import QUESTIONS, PROMPTS, _chat, _sse, library, published, server  # noqa: E402,F401 (fixtures)


@pytest.fixture(scope="module")
def client(server):
    # max_retries=0: a 5xx must show up here, not be retried away.
    c = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="not-checked", max_retries=0, timeout=120)
    yield c
    c.close()


def _ask(client, model, content=QUESTIONS[0], **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, **kw)


def test_chat_completion_and_names_on_both_backends(client, server, library):
    """`<adapter>` and Ray Serve LLM's `<base>:<adapter>` name the same adapter."""
    base = server["base"]
    for model, adapter in [("pirate", "pirate"), (f"{base}:pirate", "pirate"), (f"{base}:french.v1", "french.v1"),
                           (base, None)]:
        r = _ask(client, model)
        assert r.object == "chat.completion" and r.model == model
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == library.reply(adapter, QUESTIONS[0]), model
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    assert client.models.retrieve(f"{base}:pirate").id == f"{base}:pirate"


def test_streaming_with_the_openai_client(client, server, library):
    plain = _ask(client, "french.v1", max_tokens=20)
    chunks = list(_ask(client, "french.v1", max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content == library.reply("french.v1", QUESTIONS[0], max_tokens=20)
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    # Without include_usage no chunk has usage.
    assert all(c.usage is None for c in _ask(client, "french.v1", stream=True))


def test_include_usage_every_chunk_has_usage_null_but_the_last(server):
    r = server["client"].post("/v1/chat/completions", json=_chat(
        "pirate", QUESTIONS[1], max_tokens=16, stream=True, stream_options={"include_usage": True}))
    events = _sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 3 and all("usage" in c for c in chunks)
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["usage"]["completion_tokens"] > 0 and chunks[-1]["choices"] == []


def test_models_list(client, server):
    ids = {m.id for m in client.models.list()}
    assert ids == {server["base"], *PROMPTS}


def test_errors_are_the_clients_typed_exceptions(client, server):
    for model in ("parrot", f"{server['base']}:parrot"):
        with pytest.raises(openai.NotFoundError) as e:
            _ask(client, model)
        assert e.value.status_code == 404 and e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("parrot")
    with pytest.raises(openai.BadRequestError) as e:  # ':' only after the base name
        _ask(client, "other-base:pirate")
    assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, "pirate", max_tokens=0)
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("logit_bias", {"42": 100}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1.0),
    ("n", 2),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"),
    ("logprobs", True),
    ("top_logprobs", 3),
])
def test_fields_genpi_cannot_honour_are_refused_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, "pirate", **{field: value})
    assert e.value.status_code == 400 and e.value.param == field and field in e.value.message


def test_default_values_of_those_fields_are_accepted(client):
    r = _ask(client, "pirate", response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0, n=1,
             logit_bias={}, logprobs=False, tool_choice="none")
    assert r.choices[0].message.content == _ask(client, "pirate").choices[0].message.content


def test_stop_is_honoured_streaming_or_not(client):
    full = _ask(client, "pirate", QUESTIONS[2], max_tokens=24).choices[0].message.content
    # A stop string from the middle of the greedy reply (not after whitespace, which the
    # server strips at the end of a reply), so the expected reply is the text before it.
    k = next(i for i in range(len(full) // 2, len(full) - 2) if not full[i - 1].isspace())
    stop = full[k:k + 3]
    expected = full[:full.index(stop)]
    r = _ask(client, "pirate", QUESTIONS[2], max_tokens=24, stop=[stop, "never-in-the-reply"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(_ask(client, "pirate", QUESTIONS[2], max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, "pirate", stop=["a", "b", "c", "d", "e"])
    assert e.value.param == "stop"


def test_developer_role_is_a_system_message(client):
    def ask(role):
        return client.chat.completions.create(model="pirate", temperature=0, max_tokens=12, messages=[
            {"role": role, "content": "Answer in one short sentence."}, {"role": "user", "content": QUESTIONS[0]}])

    dev, system = ask("developer"), ask("system")
    assert dev.choices[0].message.content == system.choices[0].message.content
    assert dev.usage.prompt_tokens == system.usage.prompt_tokens
    # ... and it is not ignored: the instructions replace the template's default system prompt.
    assert dev.usage.prompt_tokens != _ask(client, "pirate").usage.prompt_tokens
