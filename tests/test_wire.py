"""The KV cache wire format: bit-exact round trips and errors that name the bad field."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from cachetalk.client import wire

LAYER_KINDS = ["sliding", "full", "sliding"]
KV_HEADS, HEAD_DIM, TOKENS = 2, 8, 5


def random_layers(dtype: str, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Make per layer a (keys, values) pair of `[kv_heads, tokens, head_dim]` arrays with edge values mixed in."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in LAYER_KINDS:
        pair = []
        for _ in range(2):
            values = rng.standard_normal((KV_HEADS, TOKENS, HEAD_DIM)).astype(np.float32)  # [kv_heads, tokens, head_dim]
            values.flat[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40]
            if dtype == "bfloat16":
                # bf16 is the upper half of the float32 bit pattern.
                pair.append((values.view(np.uint32) >> 16).astype(np.uint16))
            else:
                pair.append(values.astype(wire.DTYPES[dtype]))
        layers.append((pair[0], pair[1]))
    return layers


def make_cache(dtype: str = "float32") -> wire.KVCache:
    header = wire.KVHeader(fingerprint="0123abcd", dtype=dtype, layer_kinds=list(LAYER_KINDS), kv_heads=KV_HEADS,
                           head_dim=HEAD_DIM, token_ids=[7, 8, 9, 10, 11], model="test-model")
    return wire.KVCache(header, random_layers(dtype))


def edited(message: bytes, header_changes: dict | None = None, drop: tuple[str, ...] = (), body=None) -> bytes:
    """Re-pack a message with header fields changed or removed, or with another body."""
    unpacked = msgpack.unpackb(message, raw=False)
    unpacked["header"].update(header_changes or {})
    for name in drop:
        del unpacked["header"][name]
    if body is not None:
        unpacked["body"] = body
    return msgpack.packb(unpacked, use_bin_type=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(dtype):
    cache = make_cache(dtype)
    message = wire.encode(cache)
    decoded = wire.decode(message)

    assert decoded.header == cache.header
    assert len(decoded.layers) == len(cache.layers)
    for (keys, values), (sent_keys, sent_values) in zip(decoded.layers, cache.layers):
        assert keys.shape == (KV_HEADS, TOKENS, HEAD_DIM)
        assert keys.dtype == wire.DTYPES[dtype]
        assert keys.tobytes() == sent_keys.tobytes()
        assert values.tobytes() == sent_values.tobytes()
    assert wire.encode(decoded) == message


def test_header_decodes_without_body():
    message = wire.encode(make_cache("float16"))
    header, body = wire.decode_header(message)
    assert header.num_layers == len(LAYER_KINDS)
    assert header.layer_kinds == LAYER_KINDS
    assert header.num_tokens == TOKENS
    assert len(body) == header.body_size() == 2 * len(LAYER_KINDS) * KV_HEADS * TOKENS * HEAD_DIM * 2


def test_decoded_arrays_are_read_only():
    keys, _ = wire.decode(wire.encode(make_cache())).layers[0]
    with pytest.raises(ValueError):
        keys[0, 0, 0] = 1.0


HEADER_ERRORS = [
    ("unknown version", {"version": 99}, (), "version"),
    ("unknown dtype", {"dtype": "int8"}, (), "dtype"),
    ("dtype not a string", {"dtype": 4}, (), "dtype"),
    ("fingerprint missing", {}, ("fingerprint",), "fingerprint"),
    ("fingerprint not a string", {"fingerprint": 12}, (), "fingerprint"),
    ("kv_heads missing", {}, ("kv_heads",), "kv_heads"),
    ("kv_heads a string", {"kv_heads": "2"}, (), "kv_heads"),
    ("kv_heads a bool", {"kv_heads": True}, (), "kv_heads"),
    ("head_dim zero", {"head_dim": 0}, (), "head_dim"),
    ("num_layers missing", {}, ("num_layers",), "num_layers"),
    ("layer_kinds too short", {"layer_kinds": ["full"]}, (), "layer_kinds"),
    ("layer kind unknown", {"layer_kinds": ["full", "full", "local"]}, (), "layer_kinds"),
    ("token_ids negative", {"token_ids": [1, -2, 3, 4, 5]}, (), "token_ids"),
    ("token_ids not a list", {"token_ids": "12345"}, (), "token_ids"),
    ("num_tokens disagrees", {"num_tokens": 6}, (), "num_tokens"),
]


@pytest.mark.parametrize("case, changes, drop, field", HEADER_ERRORS, ids=[case[0] for case in HEADER_ERRORS])
def test_invalid_header_names_field(case, changes, drop, field):
    message = edited(wire.encode(make_cache()), changes, drop)
    with pytest.raises(wire.WireFormatError) as error:
        wire.decode(message)
    assert error.value.field == field
    assert f"'{field}'" in str(error.value)


def test_wrong_body_size_names_body():
    message = wire.encode(make_cache())
    body = msgpack.unpackb(message, raw=False)["body"]
    for wrong in (body[:-4], body + b"\0\0\0\0", b""):
        with pytest.raises(wire.WireFormatError) as error:
            wire.decode(edited(message, body=wrong))
        assert error.value.field == "body"
        assert str(len(wrong)) in str(error.value)


def test_header_describing_more_tokens_names_body():
    message = edited(wire.encode(make_cache()), {"token_ids": [1, 2, 3, 4, 5, 6], "num_tokens": 6})
    with pytest.raises(wire.WireFormatError) as error:
        wire.decode(message)
    assert error.value.field == "body"


def test_body_not_bytes_names_body():
    with pytest.raises(wire.WireFormatError) as error:
        wire.decode(edited(wire.encode(make_cache()), body="text"))
    assert error.value.field == "body"


@pytest.mark.parametrize("cut", [1, 100, 1000])
def test_truncated_message_is_rejected(cut):
    message = wire.encode(make_cache())
    with pytest.raises(wire.WireFormatError) as error:
        wire.decode(message[:-cut])
    assert error.value.field == "message"


@pytest.mark.parametrize("message", [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2, 3]),
                                     msgpack.packb({"header": {}}), msgpack.packb({1: 2})],
                         ids=["empty", "reserved byte", "text", "list", "no body", "integer keys"])
def test_malformed_msgpack_names_message(message):
    with pytest.raises(wire.WireFormatError) as error:
        wire.decode(message)
    assert error.value.field == "message"


def test_header_not_a_map_names_header():
    with pytest.raises(wire.WireFormatError) as error:
        wire.decode(msgpack.packb({"header": [1], "body": b""}, use_bin_type=True))
    assert error.value.field == "header"


def test_encode_rejects_wrong_shape_dtype_and_count():
    cache = make_cache()
    keys, values = cache.layers[0]

    wrong_shape = wire.KVCache(cache.header, [(keys[:, :-1], values[:, :-1])] + cache.layers[1:])
    with pytest.raises(wire.WireFormatError) as error:
        wire.encode(wrong_shape)
    assert error.value.field == "layers"

    wrong_dtype = wire.KVCache(cache.header, [(keys.astype(np.float16), values)] + cache.layers[1:])
    with pytest.raises(wire.WireFormatError) as error:
        wire.encode(wrong_dtype)
    assert error.value.field == "dtype"

    too_few = wire.KVCache(cache.header, cache.layers[:-1])
    with pytest.raises(wire.WireFormatError) as error:
        wire.encode(too_few)
    assert error.value.field == "num_layers"
