"""The gateway on the real default model (SmolLM2-135M-Instruct, transformers backend, CPU): seed
reproducibility, the chat template, stop strings, streamed text equal to plain text. Few and short."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from mesh.client import MeshClient
from tests.gateways.test_openai_helpers import Gateway, start_gateway
from tests.support import ProcessGroup, free_broker_url, wait_for_workers

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
API_KEY = "token-abc123"


@pytest.fixture(scope="module")
def model_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    group = ProcessGroup(tmp_path_factory.mktemp("openai-model"))
    try:
        url = free_broker_url()
        group.broker(url)
        group.mesh("worker", "worker", "--broker", url)

        async def ready() -> None:
            async with MeshClient(url) as client:
                await wait_for_workers(client, 1, timeout=240, model=MODEL)

        asyncio.run(ready())
        yield start_gateway(group, url, "--api-keys", API_KEY, models=(MODEL,))
    except BaseException:
        print(group.dump_logs())
        raise
    finally:
        group.stop_all()


def test_acceptance_script_prints_true(model_gateway: Gateway) -> None:
    """The issue's acceptance script, verbatim but for the port."""
    from openai import OpenAI

    client = OpenAI(base_url=model_gateway.v1, api_key="token-abc123")
    xs = []
    for _ in range(2):
        completion = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Hello!"}],
            seed=1,
            max_tokens=200,
        )
        xs.append(completion.choices[0].message.content)
    assert xs[0] == xs[1]
    assert xs[0]


def test_different_seeds_differ_and_wrong_key_is_refused(model_gateway: Gateway) -> None:
    client = model_gateway.sdk(api_key=API_KEY)
    messages = [{"role": "user", "content": "Write a word."}]
    texts = {
        client.chat.completions.create(model=MODEL, messages=messages, seed=seed, temperature=1.0, max_tokens=12)
        .choices[0]
        .message.content
        for seed in (1, 2, 3)
    }
    assert len(texts) > 1
    with pytest.raises(openai.AuthenticationError):
        model_gateway.sdk(api_key="wrong").chat.completions.create(model=MODEL, messages=messages, max_tokens=1)


def test_chat_template_is_applied(model_gateway: Gateway) -> None:
    client = model_gateway.sdk(api_key=API_KEY)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=1, temperature=0
    )
    raw = client.completions.create(model=MODEL, prompt="Hello!", max_tokens=1, temperature=0)
    # The template wraps the message in role markers (and a default system prompt): many more tokens.
    assert chat.usage is not None and raw.usage is not None
    assert chat.usage.prompt_tokens > raw.usage.prompt_tokens + 4


def test_stream_equals_plain_and_stop_strings(model_gateway: Gateway) -> None:
    client = model_gateway.sdk(api_key=API_KEY)
    messages = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    text = plain.choices[0].message.content or ""
    assert streamed == text and text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]
    # Stop on a piece of the greedy text: the output ends before it, finish_reason "stop".
    stop = text.strip()[len(text.strip()) // 2 :][:3]
    stopped = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24, stop=[stop])
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in (choice.message.content or "") and text.startswith(choice.message.content or "")


def test_logprobs(model_gateway: Gateway) -> None:
    client = model_gateway.sdk(api_key=API_KEY)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    prompt = "The capital of France is"
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, logprobs=2, echo=True, temperature=0)
    logprobs = text.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.text_offset is not None
    assert text.usage is not None and len(logprobs.tokens) == text.usage.prompt_tokens + 3  # echo: the prompt's too
    assert text.choices[0].text == "".join(logprobs.tokens)
    assert logprobs.text_offset[text.usage.prompt_tokens] == len(prompt)


def test_chat_logprob_bytes_put_split_characters_back_together(model_gateway: Gateway) -> None:
    """Each emoji is several byte tokens, and each such token alone decodes to U+FFFD: `bytes` must be
    the token's own bytes, so that joined they give the reply (OpenAI's reason for the field)."""
    client = model_gateway.sdk(api_key=API_KEY)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Repeat exactly: 🍕🍕🍕 😀😀😀"}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    text = reply.choices[0].message.content or ""
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and "🍕" in text
    assert any(item.token == "\ufffd" for item in content)  # a piece of a character, as text
    assert b"".join(bytes(item.bytes or []) for item in content).decode() == text
    for item in content:
        assert all(top.bytes for top in item.top_logprobs)


def test_streamed_completion_logprobs_match_the_plain_ones(model_gateway: Gateway) -> None:
    """Text held back by a possible stop string arrives later, but its tokens' entries do not wait for it."""
    client = model_gateway.sdk(api_key=API_KEY)
    request = {
        "model": MODEL,
        "prompt": "The capital of France is Paris. The capital of Germany is",
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": 1,
        "stop": ["capital of Spain"],  # the greedy text says "capital of" again: it is held back a while
    }
    plain = client.completions.create(**request).choices[0]  # type: ignore[call-overload]
    assert plain.logprobs is not None and "capital of" in plain.text
    text, tokens, offsets = "", [], []
    for chunk in client.completions.create(stream=True, **request):  # type: ignore[call-overload]
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens or []
                offsets += choice.logprobs.text_offset or []
    assert text == plain.text
    assert tokens == plain.logprobs.tokens and offsets == plain.logprobs.text_offset


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(model_gateway: Gateway) -> None:
    """An evaluation harness's loglikelihood request: echo, logprobs, max_tokens 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mesh.models import resolve_model

    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    scored = model_gateway.sdk(api_key=API_KEY).completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, logprobs=1, echo=True
    )
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == scored.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None

    path = resolve_model(None).path
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    ids = tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    chosen = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), chosen, atol=1e-3)
    best = expected.max(dim=-1).values
    assert [next(iter(top.values())) for top in lp.top_logprobs[1:]] == pytest.approx(best.tolist(), abs=1e-3)
    # The repeated sentence is far more predictable the second time: the scores mean something.
    third = len(lp.tokens) // 3
    assert sum(lp.token_logprobs[2 * third + 1 :]) > sum(lp.token_logprobs[1 : third + 1])  # type: ignore[arg-type]
