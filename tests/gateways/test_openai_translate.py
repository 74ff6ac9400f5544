"""OpenAI requests into mesh requests: pure functions, tested on plain data."""

from __future__ import annotations

import pytest

from gateways.openai.errors import ApiError
from gateways.openai.schemas import INT64_MAX, INT64_MIN, ChatCompletionRequest, CompletionRequest
from gateways.openai.translate import ModelLimits, chat_choices, completion_choices

HELLO = [{"role": "user", "content": "Hello"}]
LIMITS = ModelLimits(context_length=2048)


def _chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": HELLO, **fields})


def test_each_choice_gets_its_own_seed_and_index() -> None:
    choices = chat_choices(_chat(n=3, seed=INT64_MAX), LIMITS, 1024)
    assert [c.request.seed for c in choices] == [INT64_MAX, INT64_MIN, INT64_MIN + 1]  # wrapped, still int64
    assert [c.request.choice_index for c in choices] == [0, 1, 2]
    # Without a seed the worker picks one (its --seed, offset by the index, or a random one).
    assert [c.request.seed for c in chat_choices(_chat(n=2), LIMITS, 1024)] == [None, None]


def test_an_unset_max_tokens_is_a_default_the_worker_may_lower() -> None:
    [default] = chat_choices(_chat(), LIMITS, 1024)
    assert (default.request.max_tokens, default.request.fit_to_context) == (1024, True)
    [small_context] = chat_choices(_chat(), ModelLimits(context_length=512), 1024)
    assert small_context.request.max_tokens == 512
    [chosen] = chat_choices(_chat(max_tokens=100), LIMITS, 1024)
    assert (chosen.request.max_tokens, chosen.request.fit_to_context) == (100, False)
    [completion] = completion_choices(CompletionRequest.model_validate({"model": "m", "prompt": "x"}), LIMITS)
    assert (completion.request.max_tokens, completion.request.fit_to_context) == (16, True)


def test_a_chosen_max_tokens_over_the_context_is_refused_here() -> None:
    with pytest.raises(ApiError) as info:
        chat_choices(_chat(max_tokens=4096), LIMITS, 1024)
    assert info.value.status == 400 and info.value.param == "max_tokens"
    with pytest.raises(ApiError):  # token ids: the prompt's length is known here
        completion_choices(
            CompletionRequest.model_validate({"model": "m", "prompt": list(range(2000)), "max_tokens": 100}), LIMITS
        )
