"""The OpenAI API's structure through the real openai SDK, against real broker, worker and gateway processes.

The worker runs the synthetic engine (fake tokens, no model): these tests check
the shape of what the gateway sends, which the model's speed would only slow.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.gateways.test_openai_helpers import (  # noqa: F401 (fixtures)
    Gateway,
    gateway_fixture,
    synthetic_stack_fixture,
)

MODEL = "synthetic"
HELLO = [{"role": "user", "content": "Hello there"}]


def test_models_list_every_name_and_alias(gateway: Gateway) -> None:
    client = gateway.sdk()
    ids = {model.id for model in client.models.list()}
    assert {"synthetic", "synthetic-alias"} <= ids
    model = client.models.retrieve("synthetic-alias")
    assert model.id == "synthetic-alias" and model.object == "model"


def test_chat_plain_response(gateway: Gateway) -> None:
    reply = gateway.sdk().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=7, seed=3)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    [choice] = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    usage = reply.usage
    assert usage is not None and usage.completion_tokens == 7
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.prompt_tokens > 0


def test_max_completion_tokens_same_as_max_tokens(gateway: Gateway) -> None:
    client = gateway.sdk()
    a = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, seed=1)
    b = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=5, seed=1)
    assert a.usage.completion_tokens == b.usage.completion_tokens == 5  # type: ignore[union-attr]
    assert a.choices[0].message.content == b.choices[0].message.content


def test_max_completion_tokens_on_completions_too(gateway: Gateway) -> None:
    reply = gateway.sdk().completions.create(model=MODEL, prompt="x", extra_body={"max_completion_tokens": 7})
    assert reply.usage is not None and reply.usage.completion_tokens == 7 and reply.choices[0].finish_reason == "length"


def test_seed_reproducible_on_synthetic_structure(gateway: Gateway) -> None:
    client = gateway.sdk()
    texts = {
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, seed=42).choices[0].message.content
        for _ in range(2)
    }
    assert len(texts) == 1


def test_multi_turn_content_parts_and_extra_fields(gateway: Gateway) -> None:
    client = gateway.sdk()
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    as_string = client.chat.completions.create(model=MODEL, messages=turns, max_tokens=6, seed=5)
    as_parts = [dict(t, content=[{"type": "text", "text": t["content"]}]) for t in turns]
    with_parts = client.chat.completions.create(
        model=MODEL,
        messages=as_parts,
        max_tokens=6,
        seed=5,
        extra_body={"some_future_field": {"x": 1}},
        metadata={"who": "test"},
        store=False,
    )
    assert as_string.choices[0].message.content == with_parts.choices[0].message.content


def test_n_choices_and_usage(gateway: Gateway) -> None:
    reply = gateway.sdk().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, n=3, seed=9)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # seed + i per choice
    usage = reply.usage
    assert usage is not None and usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_structure(gateway: Gateway) -> None:
    stream = gateway.sdk().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, seed=2, stream=True)
    chunks = list(stream)
    assert {(c.id, c.object, c.created, c.model) for c in chunks} == {
        (chunks[0].id, "chat.completion.chunk", chunks[0].created, MODEL)
    }
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == "length" and finishes.count("length") == 1 and set(finishes[:-1]) == {None}
    assert all(c.usage is None for c in chunks)
    joined = "".join(c.choices[0].delta.content or "" for c in chunks)
    plain = gateway.sdk().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, seed=2)
    assert joined == plain.choices[0].message.content


def test_stream_include_usage(gateway: Gateway) -> None:
    stream = gateway.sdk().chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=5, n=2, seed=1, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    *body, last = chunks
    assert all(c.usage is None for c in body) and all(c.choices for c in body)
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 10
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    # n > 1: chunks carry their choice's index, each choice has exactly one finish, its last chunk.
    for index in (0, 1):
        mine = [c.choices[0] for c in body if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine][-1] == "length"
        assert sum(c.finish_reason is not None for c in mine) == 1


def test_raw_sse_wire_format(gateway: Gateway) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["x-request-id"]
        raw = reply.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        json.loads(event.removeprefix("data: "))


@pytest.mark.parametrize(
    ("prompt", "count"),
    [("one two three", 1), (["first prompt", "second prompt here"], 2), ([1, 2, 3, 4], 1), ([[1, 2], [3, 4, 5]], 2)],
)
def test_completion_prompt_shapes(gateway: Gateway, prompt: object, count: int) -> None:
    reply = gateway.sdk().completions.create(model=MODEL, prompt=prompt, max_tokens=3, seed=4)  # type: ignore[arg-type]
    assert reply.object == "text_completion" and [c.index for c in reply.choices] == list(range(count))
    assert all(c.finish_reason == "length" and c.text for c in reply.choices)
    assert reply.usage is not None and reply.usage.completion_tokens == 3 * count
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_echo_and_default_max_tokens(gateway: Gateway) -> None:
    client = gateway.sdk()
    plain = client.completions.create(model=MODEL, prompt="say it again", seed=8)
    echoed = client.completions.create(model=MODEL, prompt="say it again", seed=8, echo=True)
    assert plain.usage is not None and plain.usage.completion_tokens == 16  # OpenAI's default for completions
    assert echoed.choices[0].text == "say it again" + plain.choices[0].text


def test_unset_max_tokens_fits_what_the_prompt_leaves(gateway: Gateway) -> None:
    """As with OpenAI, a request that sets no max_tokens is not refused for a long prompt: it gets the
    room the prompt leaves (the synthetic context is 4096; a prompt word is a token)."""
    client = gateway.sdk()
    long_chat = [{"role": "user", "content": "word " * 3500}]
    chat = client.chat.completions.create(model=MODEL, messages=long_chat)  # type: ignore[arg-type]
    assert chat.choices[0].finish_reason == "length" and chat.usage is not None
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == 4096
    text = client.completions.create(model=MODEL, prompt="word " * 4090)
    assert text.usage is not None and text.usage.completion_tokens == 4096 - text.usage.prompt_tokens < 16
    with pytest.raises(openai.BadRequestError):  # a max_tokens the user chose is never lowered
        client.chat.completions.create(model=MODEL, messages=long_chat, max_tokens=1000)  # type: ignore[arg-type]


def test_echo_with_logprobs_scores_the_prompt_streamed_or_not(gateway: Gateway) -> None:
    """The way evaluation harnesses score text: echo, logprobs, max_tokens 0 (synthetic logprobs here;
    tests/gateways/test_openai_model.py checks the real model's values)."""
    client = gateway.sdk()
    prompt = "score these four words"
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp is not None and lp.tokens == ["score", " these", " four", " words"]
    assert lp.text_offset == [0, 5, 11, 16]
    assert lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert all(v is not None and v < 0 for v in lp.token_logprobs[1:])
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    assert all(len(top or {}) == 2 for top in lp.top_logprobs[1:])

    generated = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1, seed=5)
    glp = generated.choices[0].logprobs
    assert glp is not None and glp.tokens is not None and glp.text_offset is not None
    assert glp.tokens[:4] == lp.tokens and len(glp.tokens) == 4 + 3
    assert "".join(glp.tokens) == generated.choices[0].text
    assert glp.text_offset[4] == len(prompt)  # the completion's offsets go on after the prompt's

    chunks = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1, seed=5, stream=True)
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens or []] == glp.tokens
    assert [v for s in streamed for v in s.token_logprobs or []] == glp.token_logprobs
    assert [o for s in streamed for o in s.text_offset or []] == glp.text_offset
    assert chunks[0].choices[0].text.startswith(prompt)  # alone, or merged with the first token


def test_completion_list_with_n_is_prompt_major(gateway: Gateway) -> None:
    reply = gateway.sdk().completions.create(model=MODEL, prompt=["a b", "c d"], n=2, max_tokens=2, seed=3)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    single = gateway.sdk().completions.create(model=MODEL, prompt="c d", n=2, max_tokens=2, seed=3)
    assert [c.text for c in reply.choices[2:]] == [c.text for c in single.choices]


def test_completion_stream(gateway: Gateway) -> None:
    client = gateway.sdk()
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="stream me",
            max_tokens=5,
            seed=6,
            stream=True,
            echo=True,
            stream_options={"include_usage": True},
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 5
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "text_completion" for c in chunks)
    joined = "".join(c.choices[0].text for c in body)
    plain = client.completions.create(model=MODEL, prompt="stream me", max_tokens=5, seed=6, echo=True)
    assert joined == plain.choices[0].text and joined.startswith("stream me")
    assert [c.choices[0].finish_reason for c in body][-1] == "length"


async def test_async_sdk_concurrent_streams(gateway: Gateway) -> None:
    import asyncio

    client = gateway.async_sdk()

    async def one(seed: int) -> str:
        stream = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=10, seed=seed, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    texts = await asyncio.gather(*(one(s) for s in range(8)))
    assert all(len(t.split()) == 10 for t in texts)
    await client.close()
