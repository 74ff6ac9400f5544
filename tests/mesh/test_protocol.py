"""The wire protocol: headers, typed bodies, and refusal of anything malformed."""

from __future__ import annotations

import msgspec
import pytest

from mesh.protocol import (
    PROTOCOL_VERSION,
    Announcement,
    ChatMessage,
    Done,
    ErrorCode,
    ErrorReply,
    FinishReason,
    GenerateRequest,
    Kind,
    ProtocolError,
    TokenChunk,
    decode,
    encode,
    new_request_id,
    offset_seed,
    pack_header,
    parse_header,
)


def test_header_round_trip() -> None:
    request_id = new_request_id()
    for kind in Kind:
        assert parse_header(pack_header(kind, request_id)) == (kind, request_id)
    assert parse_header(pack_header(Kind.BEACON)) == (Kind.BEACON, b"")


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01",
        bytes((PROTOCOL_VERSION + 1, Kind.SUBMIT)) + b"x" * 16,  # unknown version
        bytes((PROTOCOL_VERSION, 200)) + b"x" * 16,  # unknown kind
        bytes((PROTOCOL_VERSION, Kind.SUBMIT)) + b"x" * 5,  # truncated request id
    ],
)
def test_bad_headers_are_refused(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_header(frame)


def test_bodies_round_trip() -> None:
    request = GenerateRequest(
        model="m", messages=[ChatMessage("user", "hi")], max_tokens=3, stop=["\n"], seed=2**62, logprobs=2
    )
    assert decode(encode(request), GenerateRequest) == request
    done = Done(FinishReason.LENGTH, 5, 3, "w1", "tail", [7])
    assert decode(encode(done), Done) == done
    assert decode(encode(ErrorReply(ErrorCode.OVERLOADED, "busy")), ErrorReply).code is ErrorCode.OVERLOADED
    announcement = Announcement(worker_id="w", models=["a", "b"], backend="synthetic", capacity=4)
    assert decode(encode(announcement), Announcement) == announcement


def test_token_chunks_are_positional_and_small() -> None:
    chunk = TokenChunk(" hello", [15339])
    body = encode(chunk)
    assert msgspec.msgpack.decode(body)[:2] == [" hello", [15339]]  # positional: no field names
    assert len(body) <= 16


@pytest.mark.parametrize(
    ("body", "type_"),
    [
        (b"\xc1", GenerateRequest),  # never-used msgpack byte
        (msgspec.msgpack.encode({"prompt": "no model"}), GenerateRequest),
        (msgspec.msgpack.encode({"model": 5}), GenerateRequest),
        (msgspec.msgpack.encode(["text", "not a list"]), TokenChunk),
        (msgspec.msgpack.encode([9, 1, 1, "w"]), Done),  # unknown finish reason
        (msgspec.msgpack.encode(["no_such_code", "x"]), ErrorReply),
    ],
)
def test_malformed_bodies_raise_protocol_error(body: bytes, type_: type) -> None:
    with pytest.raises(ProtocolError):
        decode(body, type_)


def test_unknown_fields_are_tolerated_for_forward_compatibility() -> None:
    body = msgspec.msgpack.encode({"model": "m", "a_future_field": 1})
    assert decode(body, GenerateRequest).model == "m"


def test_seed_offsets_wrap_within_int64() -> None:
    assert offset_seed(5, 2) == 7
    assert offset_seed(2**63 - 1, 1) == -(2**63)
    assert offset_seed(-(2**63), 0) == -(2**63)
