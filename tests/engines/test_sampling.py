"""Pure pieces of the transformers backend: sampling, stop strings, incremental detokenization."""

from __future__ import annotations

import math

import pytest
import torch

from mesh.engines import sampling
from mesh.engines.batching import BatchState, prefill_inputs
from mesh.engines.detokenize import IncrementalDetokenizer
from mesh.engines.stop import StopMatcher, TextStream
from mesh.protocol import GenerateRequest

VOCAB = 50


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))


def _params(**kw: object) -> sampling.SamplingParams:
    return sampling.SamplingParams(**kw)  # type: ignore[arg-type]


def test_temperature_zero_is_argmax() -> None:
    logits = _logits()
    generator, _ = sampling.make_generator(1)
    assert sampling.sample(logits, _params(temperature=0.0), generator) == int(logits.argmax())


def test_same_seed_same_draws_and_other_seed_differs() -> None:
    logits = _logits()
    params = _params(temperature=1.0)

    def draws(seed: int) -> list[int]:
        generator, _ = sampling.make_generator(seed)
        return [sampling.sample(logits, params, generator) for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("params", [_params(temperature=1.0), _params(temperature=0.8, top_k=5, top_p=0.9)])
def test_skipping_the_draws_of_sampled_tokens_continues_the_same_sequence(params: sampling.SamplingParams) -> None:
    rows = [_logits(seed) for seed in range(40)]  # a different distribution at every step
    generator, _ = sampling.make_generator(21)
    whole = [sampling.sample(row, params, generator) for row in rows]
    resumed, _ = sampling.make_generator(21)
    sampling.skip_draws(resumed, 25)  # a migrated request that had 25 tokens already
    assert [sampling.sample(row, params, resumed) for row in rows[25:]] == whole[25:]
    afresh, _ = sampling.make_generator(21)
    assert [sampling.sample(row, params, afresh) for row in rows[25:]] != whole[25:]


def test_missing_seed_gets_a_random_one() -> None:
    _, a = sampling.make_generator(None)
    _, b = sampling.make_generator(None)
    assert a != b


def test_top_k_keeps_only_the_k_best() -> None:
    logits = _logits(3)
    best = set(torch.topk(logits, 3).indices.tolist())
    generator, _ = sampling.make_generator(0)
    seen = {sampling.sample(logits, _params(temperature=5.0, top_k=3), generator) for _ in range(200)}
    assert seen <= best and len(seen) > 1


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    out = sampling.filter_logits(logits, _params(top_p=0.7))
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    # A tiny top_p still keeps the most likely token.
    out = sampling.filter_logits(logits, _params(top_p=0.01))
    assert torch.isfinite(out).tolist() == [True, False, False, False]


def test_repetition_penalty_pushes_seen_tokens_down() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    counts = sampling.TokenCounts(3, prompt_ids=[0, 1])
    out = sampling.apply_penalties(logits, _params(repetition_penalty=2.0), counts)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(3)
    counts = sampling.TokenCounts(3, prompt_ids=[2])
    counts.add(0)
    counts.add(0)
    counts.add(1)
    out = sampling.apply_penalties(logits, _params(presence_penalty=0.5, frequency_penalty=0.25), counts)
    assert out.tolist() == pytest.approx([-1.0, -0.75, 0.0])


def test_logprobs_are_the_models_distribution() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    chosen, top = sampling.token_logprobs(logits, 1, 2)
    assert chosen == pytest.approx(math.log(0.3), abs=1e-6)
    assert [t for t, _ in top] == [0, 1]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", math.nan),
        ("top_k", -1),
        ("logprobs", 21),
        ("prompt_logprobs", 60000),
        ("prompt_logprobs", -1),
        ("presence_penalty", 3.0),
        ("frequency_penalty", math.nan),
        ("repetition_penalty", math.nan),
    ],
)
def test_validate_names_the_bad_setting(field: str, value: object) -> None:
    request = GenerateRequest(model="m", prompt="x", **{field: value})  # type: ignore[arg-type]
    assert field in (sampling.validate(request) or "")


# --------------------------------------------------------------------------- stop strings


def _stream(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        result = matcher.feed(piece)
        out += result.text
        if result.stopped:
            return out, True
    return out + matcher.flush(), False


def test_stop_string_spanning_tokens_is_never_emitted() -> None:
    matcher = StopMatcher(["STOP"])
    emitted = []
    for piece in ["Hello S", "T", "O", "P and more"]:
        result = matcher.feed(piece)
        emitted.append(result.text)
        if result.stopped:
            break
    assert "".join(emitted) == "Hello "
    assert result.stopped
    assert not any("S" in e for e in emitted)


def test_held_text_is_released_when_it_is_not_a_stop() -> None:
    assert _stream(StopMatcher(["STOP"]), ["a S", "T", "x"]) == ("a STx", False)
    assert _stream(StopMatcher(["STOP"]), ["end S"]) == ("end S", False)  # flushed at the end


def test_earliest_of_several_stop_strings_wins() -> None:
    assert _stream(StopMatcher(["b", "cd"]), ["a cd b"]) == ("a ", True)


def test_no_stop_strings_passes_text_through() -> None:
    assert StopMatcher([]).feed("anything").text == "anything"


# --------------------------------------------------------------------------- detokenization


class _ByteTokenizer:
    """Token i is one UTF-8 byte; decoding joins bytes (like a byte-level BPE), U+FFFD for broken ones."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_never_split() -> None:
    text = "héllo 🙂 wörld"
    detok = IncrementalDetokenizer(_ByteTokenizer().decode)
    deltas = [detok.add(b) for b in text.encode()]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


def test_detokenization_matches_a_full_decode_with_the_real_tokenizer() -> None:
    from transformers import AutoTokenizer

    from mesh.models import cache_root, default_gguf_path

    folder = cache_root() / "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").is_file():
        from tests.support import ARTIFACTS

        folder = ARTIFACTS / "models" / "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no converted default model yet (run the model tests first); source {default_gguf_path()}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = "Hello world,  two  spaces; naïve café 🙂 — 東京\n  indented"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(lambda i: tokenizer.decode(i, skip_special_tokens=True))
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- batch cache bookkeeping


def _state(length: int, fill: float) -> BatchState:
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for layer in range(2):
        cache.update(torch.full((1, 3, length, 4), fill), torch.full((1, 3, length, 4), -fill), layer)
    return BatchState.from_prefill(cache, torch.ones(1, length, dtype=torch.long))


def test_prefill_inputs_left_pad_and_number_each_row_from_zero() -> None:
    ids, mask, positions = prefill_inputs([[5, 6, 7], [8]], torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(2, 3, 3, 4), torch.zeros(2, 3, 3, 4), 0)
    assert BatchState.from_prefill(cache, mask).positions.tolist() == [3, 1]  # each row's next position


def test_merge_left_pads_the_shorter_rows_and_keep_trims_padding() -> None:
    batch = _state(5, 1.0)
    batch.merge(_state(2, 2.0))
    assert batch.mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch.positions.tolist() == [5, 2]
    keys = batch.cache.layers[0].keys
    assert keys.shape == (2, 3, 5, 4) and keys[1, :, :3].abs().sum() == 0 and (keys[1, :, 3:] == 2).all()

    mask, positions = batch.step_inputs()
    assert mask.shape == (2, 6) and positions.tolist() == [[5], [2]]
    for layer in range(2):
        batch.cache.update(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4), layer)  # what a forward step does
    batch.advance(mask)

    batch.keep([1])  # the long row leaves: the short one no longer needs its padding
    assert batch.mask.tolist() == [[1, 1, 1]]
    assert batch.positions.tolist() == [3]
    assert batch.cache.layers[0].keys.shape == (1, 3, 3, 4)
    assert batch.cache.get_seq_length() == 3


def test_draws_follow_the_distribution_and_skip_impossible_tokens() -> None:
    probs = torch.tensor([0.0, 0.7, 0.0, 0.3, 0.0])
    generator, _ = sampling.make_generator(5)
    draws = [sampling.draw(probs, generator) for _ in range(2000)]
    assert set(draws) == {1, 3}
    assert 0.65 < draws.count(1) / len(draws) < 0.75


_PIECES = ["The", " waves", " of", " the", " ocean", ",", " a", " tap", "estry"]


def _decode(ids: list[int]) -> str:
    return "".join(_PIECES[i] for i in ids)


def test_a_resumed_text_stream_sends_what_the_client_has_not_seen_through_the_stops() -> None:
    # The lost worker released "The waves of the ocean" and held "," and " a" back (" a tapestry"
    # could be beginning); its client resumes with six tokens and 22 characters.
    stream = TextStream(_decode, [], [" a tapestry"], resumed=[0, 1, 2, 3, 4, 5, 6], shown_chars=22)
    first = stream.add(7)
    assert (first.text, first.stopped) == (",", False)  # " a tap" is held: the stop may be starting
    last = stream.add(8)
    assert (last.text, last.stopped) == ("", True)  # the stop string spans the handover
    plain = TextStream(_decode, [], [], resumed=[0, 1], shown_chars=4)  # " waves" not yet shown in full
    assert plain.add(2).text == "waves of"
    assert TextStream(_decode, [], [], resumed=[0, 1], shown_chars=10).finish() == ""


def test_a_resumed_text_stream_without_shown_chars_takes_what_it_would_have_let_out() -> None:
    # A client that does not say how much it received is taken to have what this stream would have let
    # out: "The waves of the ocean,", with " a" held back for the stop string.
    stream = TextStream(_decode, [], [" a tapestry"], resumed=[0, 1, 2, 3, 4, 5, 6])
    assert stream.add(7).text == ""
    assert stream.add(8).stopped
