"""Errors in OpenAI's shape and status, seen through the SDK's exception classes; the gateway keeps serving.

Real broker, worker and gateway processes; the worker runs the synthetic engine
(fake tokens, no model, context length 4096): only the gateway's answers matter here.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateways.test_openai_helpers import (  # noqa: F401 (fixtures)
    Gateway,
    gateway_fixture,
    synthetic_stack_fixture,
)

MODEL = "synthetic"
HELLO = [{"role": "user", "content": "Hello"}]


def _still_serves(gateway: Gateway) -> None:
    reply = gateway.sdk().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


def _error(reply: httpx.Response) -> dict[str, object]:
    body = reply.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert reply.headers["x-request-id"]
    return body["error"]


def test_unknown_model_is_not_found(gateway: Gateway) -> None:
    client = gateway.sdk()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert "no-such-model" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    _still_serves(gateway)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"extra_body": {"logit_bias": {"1": 5}}}, "logit_bias"),
        ({"extra_body": {"min_p": 0.1}}, "min_p"),
        ({"extra_body": {"include_stop_str_in_output": True}}, "include_stop_str_in_output"),  # vLLM's
        ({"extra_body": {"grammar": "root ::= [a-z]+"}}, "grammar"),  # llama.cpp's
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": 3.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),  # over the synthetic context of 4096
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream=true
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
        ({"extra_body": {"messages": [{"role": "user"}, {"role": "robot", "content": "x"}]}}, "messages.1.role"),
        ({"extra_body": {"messages": []}}, "messages"),
        ({"extra_body": {"stop": 5}}, "stop"),
        ({"extra_body": {"stream": "yes"}}, "stream"),
        ({"extra_body": {"stream": True, "stream_options": {"include_usage": "yes"}}}, "stream_options.include_usage"),
        ({"extra_body": {"stream": True, "stream_options": "x"}}, "stream_options"),
        ({"extra_body": {"messages": ["hi"]}}, "messages.0"),
    ],
)
def test_chat_bad_requests_name_the_parameter(gateway: Gateway, kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        gateway.sdk().chat.completions.create(model=MODEL, messages=HELLO, **kwargs)  # type: ignore[arg-type]
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param and body["type"] == "invalid_request_error"
    assert param.split(".")[0] in body["message"]


@pytest.mark.parametrize(
    ("prompt", "kwargs"),
    [
        ([], {}),
        ([[1, 2], []], {}),
        (list(range(5000)), {"max_tokens": 4}),  # token ids over the context: refused before the mesh
        ("word " * 5000, {"max_tokens": 4}),  # text over the context: the worker refuses it
        ("x", {"extra_body": {"suffix": "tail"}}),
        ("x", {"extra_body": {"best_of": 3}}),
        ("x", {"logprobs": 9}),
        ("x", {"max_tokens": -1}),  # 0 is allowed here (a scored prompt), not in chat
    ],
)
def test_completion_bad_requests(gateway: Gateway, prompt: object, kwargs: dict[str, object]) -> None:
    with pytest.raises(openai.BadRequestError):
        gateway.sdk().completions.create(model=MODEL, prompt=prompt, **kwargs)  # type: ignore[arg-type]


def test_a_prompt_over_the_context_is_named_as_openai_names_it(gateway: Gateway) -> None:
    """Tools (LangChain, LiteLLM) recognise the code and the words, and shorten the prompt: whether the
    gateway sees the overflow itself or only the worker can (a text prompt: only it tokenizes)."""
    client = gateway.sdk()
    long_text = "word " * 5000  # over the synthetic context of 4096
    attempts = [
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}]),
        lambda: client.completions.create(model=MODEL, prompt=long_text, max_tokens=4),
        lambda: client.completions.create(model=MODEL, prompt=list(range(5000)), max_tokens=4),
        lambda: client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5000),
    ]
    for attempt in attempts:
        with pytest.raises(openai.BadRequestError) as info:
            attempt()
        body = info.value.body
        assert isinstance(body, dict) and body["code"] == "context_length_exceeded", body
        assert "maximum context length is 4096 tokens" in str(body["message"])
    _still_serves(gateway)


def test_an_image_part_is_refused_by_name_and_top_logprobs_0_asks_for_nothing(gateway: Gateway) -> None:
    client = gateway.sdk()
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
        )
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "messages.0.content"
    assert "image_url" in str(body["message"]) and "text only" in str(body["message"])
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, top_logprobs=0)
    assert reply.choices[0].logprobs is None  # as vLLM: 0 alternatives without logprobs is no request at all


def test_null_is_the_default_where_openai_allows_it(gateway: Gateway) -> None:
    """The SDK sends an explicit None as null; OpenAI's API takes null for these fields."""
    client = gateway.sdk()
    chat = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, n=None, logprobs=None, stream=None, extra_body={"ignore_eos": None}
    )
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None and chat.usage.completion_tokens == 3  # type: ignore[union-attr]
    completion = client.completions.create(model=MODEL, prompt="x", max_tokens=3, n=None, echo=None, stream=None)
    assert len(completion.choices) == 1 and completion.choices[0].text and completion.usage.completion_tokens == 3  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as info:  # null is not a value where OpenAI has none
        client.chat.completions.create(
            model=MODEL, messages=HELLO, stream=True, extra_body={"stream_options": {"include_usage": None}}
        )
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "stream_options.include_usage"


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"model": "synthetic", "prompt": "x"}', {"Content-Type": "text/plain"}),
        (b'{"model": "synthetic", "prompt": "x"}', {}),
        (b"this is not json", {"Content-Type": "application/json"}),
        (b'{"model": "synthetic", "prompt": "x"', {"Content-Type": "application/json"}),
        (b'["model", "synthetic"]', {"Content-Type": "application/json"}),
        (b"\xff\xfe\x00garbage", {"Content-Type": "application/json"}),
        (b"", {"Content-Type": "application/json"}),
        # A Content-Encoding the body does not have, or one the gateway does not decode.
        (b'{"model": "synthetic", "prompt": "x"}', {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
        (b'{"model": "synthetic", "prompt": "x"}', {"Content-Type": "application/json", "Content-Encoding": "br"}),
    ],
)
def test_wrong_content_type_or_not_json_is_400(gateway: Gateway, content: bytes, headers: dict[str, str]) -> None:
    for route in ("completions", "chat/completions"):
        reply = httpx.post(f"{gateway.v1}/{route}", content=content, headers=headers, timeout=10)
        assert reply.status_code == 400, reply.text
        assert _error(reply)["type"] == "invalid_request_error"
    _still_serves(gateway)


def test_unknown_route_and_method_are_json_errors(gateway: Gateway) -> None:
    missing = httpx.get(f"{gateway.v1}/nothing-here", timeout=10)
    assert missing.status_code == 404 and _error(missing)
    wrong_method = httpx.get(f"{gateway.v1}/chat/completions", timeout=10)
    assert wrong_method.status_code == 405 and _error(wrong_method)


def test_request_id_is_echoed_or_made(gateway: Gateway) -> None:
    mine = httpx.get(f"{gateway.v1}/models", headers={"X-Request-Id": "req-123"}, timeout=10)
    assert mine.headers["x-request-id"] == "req-123"
    made = httpx.get(f"{gateway.v1}/models", headers={"X-Request-Id": "bad id\twith junk"}, timeout=10)
    assert made.headers["x-request-id"] not in ("", "bad id\twith junk")
