"""The decisions every engine shares, as pure functions."""

from __future__ import annotations

from mesh.engines.base import fit_to_context
from mesh.protocol import GenerateRequest


def test_a_default_max_tokens_is_lowered_to_the_room_left() -> None:
    default = GenerateRequest(model="m", max_tokens=1024, fit_to_context=True)
    assert fit_to_context(default, prompt_tokens=100, context_length=2048).max_tokens == 1024
    assert fit_to_context(default, prompt_tokens=1500, context_length=2048).max_tokens == 548
    resumed = GenerateRequest(model="m", max_tokens=1024, fit_to_context=True, resume_token_ids=[1] * 48)
    assert fit_to_context(resumed, prompt_tokens=1500, context_length=2048).max_tokens == 500
    # A prompt that fills the context keeps one token, for the engine's own refusal to name the sizes.
    assert fit_to_context(default, prompt_tokens=2048, context_length=2048).max_tokens == 1


def test_a_chosen_max_tokens_or_an_unknown_context_is_left_alone() -> None:
    chosen = GenerateRequest(model="m", max_tokens=1024)
    assert fit_to_context(chosen, prompt_tokens=1500, context_length=2048) is chosen
    default = GenerateRequest(model="m", max_tokens=1024, fit_to_context=True)
    assert fit_to_context(default, prompt_tokens=1500, context_length=0) is default
