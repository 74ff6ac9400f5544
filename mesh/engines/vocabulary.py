"""The raw bytes of single tokens, for logprobs.

OpenAI's logprobs give each token's UTF-8 bytes (`bytes`) so that a client can
put back together a character split over several tokens, each of which alone
decodes to U+FFFD. Decoding a token on its own cannot give them; the
tokenizer's vocabulary can, for the two schemes byte-fallback models use:

- byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen): each byte is written as one
  printable character, so a token's piece maps back to its bytes;
- SentencePiece with byte fallback (Llama 2, Mistral): `<0xNN>` pieces are
  single bytes, and U+2581 stands for a space.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte, inverted: printable ASCII and most of Latin-1 stand for
    themselves; the other 68 bytes take the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in characters:
            characters[byte] = chr(256 + len(characters) - len(printable))
    return {character: byte for byte, character in characters.items()}


def _decoder_types(tokenizer: Any) -> set[str]:
    """The types of the fast tokenizer's decoder (and of the decoders in a Sequence); none if not a fast one."""
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except (AttributeError, ValueError):
        return set()
    parts = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]
    return {part.get("type", "") for part in parts}


def raw_of(table: list[bytes | None], token_id: int) -> bytes | None:
    """`token_id`'s bytes from a token_bytes_table(), None where it does not say."""
    return table[token_id] if 0 <= token_id < len(table) else None


def token_bytes_table(tokenizer: Any) -> list[bytes | None]:
    """Each token id's bytes, indexed by id; None where the vocabulary does not say (an unknown
    scheme gives an empty table). Added tokens (<|im_end|> and such) are their text in UTF-8."""
    types = _decoder_types(tokenizer)
    if "ByteLevel" in types:
        alphabet = _byte_level_alphabet()

        def piece_bytes(piece: str) -> bytes | None:
            try:
                return bytes(alphabet[character] for character in piece)
            except KeyError:
                return None
    elif "ByteFallback" in types:

        def piece_bytes(piece: str) -> bytes | None:
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
            return piece.replace(_SENTENCEPIECE_SPACE, " ").encode()
    else:
        return []
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table = [piece_bytes(piece) if piece is not None else None for piece in pieces]
    for text, token_id in tokenizer.get_added_vocab().items():
        if 0 <= token_id < len(table):
            table[token_id] = text.encode()
    return table
