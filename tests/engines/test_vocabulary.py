"""Token bytes from the vocabulary, for both byte-fallback schemes."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mesh.engines.vocabulary import raw_of, token_bytes_table

PIZZA = "🍕".encode()  # F0 9F 8D 95: one character, which byte-fallback vocabularies split over tokens


def _fast(tokenizer: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def test_byte_level_bpe_pieces_map_back_to_their_bytes() -> None:
    # GPT-2's alphabet: "Ġ" is the space byte, and the pizza's four bytes are "ðŁįķ".
    vocab = {"ðŁ": 0, "į": 1, "ķ": 2, "Ġcaf": 3, "Ã©": 4, "<|im_end|>": 5}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    table = token_bytes_table(_fast(tokenizer, eos_token="<|im_end|>"))
    assert b"".join(raw_of(table, i) or b"" for i in (0, 1, 2)) == PIZZA
    assert raw_of(table, 3) + raw_of(table, 4) == " café".encode()  # type: ignore[operator]
    assert raw_of(table, 5) == b"<|im_end|>"  # an added token is its text
    assert raw_of(table, 99) is None and raw_of(table, -1) is None


def test_sentencepiece_byte_fallback_pieces_map_back_to_their_bytes() -> None:
    vocab = {"<unk>": 0, "<0xF0>": 1, "<0x9F>": 2, "<0x8D>": 3, "<0x95>": 4, "\u2581hi": 5}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    table = token_bytes_table(_fast(tokenizer, unk_token="<unk>"))
    assert b"".join(raw_of(table, i) or b"" for i in (1, 2, 3, 4)) == PIZZA
    assert raw_of(table, 5) == b" hi"


def test_an_unknown_scheme_gives_no_bytes() -> None:
    tokenizer = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "word": 1}, unk_token="[UNK]"))
    tokenizer.decoder = decoders.WordPiece()
    assert token_bytes_table(_fast(tokenizer, unk_token="[UNK]")) == []
