"""KV cache wire format: a msgpack header followed by raw little-endian tensor bytes.

One message is a msgpack map with two keys:

- ``header``: format version, model fingerprint, dtype, layer count, each layer's kind
  ("full" or "sliding"), KV heads, head_dim, token count and the token ids;
- ``body``: one bytes object holding, layer by layer, the keys then the values, each a
  C-contiguous ``[kv_heads, tokens, head_dim]`` array (batch size 1).

The header is validated before the body is touched, so a wrong size or an unknown
dtype is reported by field name and never reinterpreted. bf16 travels as its raw
16-bit pattern because numpy has no bf16 type. Nothing is pickled.

Version history:
    1: first version.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import msgpack
import numpy as np

FORMAT_VERSION = 1
CONTENT_TYPE = "application/msgpack"

# Wire dtype name -> numpy dtype that stores its bits (little-endian).
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
LAYER_KINDS = ("full", "sliding")


class WireFormatError(ValueError):
    """A KV cache message that cannot be decoded; `field` names the offending part."""

    def __init__(self, field: str, message: str):
        super().__init__(f"invalid KV cache message, field '{field}': {message}")
        self.field = field


@dataclass
class KVHeader:
    fingerprint: str
    dtype: str
    layer_kinds: list[str]
    kv_heads: int
    head_dim: int
    token_ids: list[int]
    version: int = FORMAT_VERSION
    model: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def layer_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.num_tokens, self.head_dim)

    def body_size(self) -> int:
        per_tensor = self.kv_heads * self.num_tokens * self.head_dim * DTYPES[self.dtype].itemsize
        return 2 * self.num_layers * per_tensor

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "layer_kinds": list(self.layer_kinds),
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_tokens": self.num_tokens,
            "token_ids": list(self.token_ids),
        }


@dataclass
class KVCache:
    """A prompt's KV cache: per layer a (keys, values) pair of `[kv_heads, tokens, head_dim]` arrays.

    Example:
        >>> import numpy as np
        >>> header = KVHeader("abc", "float32", ["full"], kv_heads=1, head_dim=2, token_ids=[5, 6])
        >>> k = np.zeros((1, 2, 2), np.float32)
        >>> cache = KVCache(header, [(k, k)])
        >>> decode(encode(cache)).header.token_ids
        [5, 6]
    """

    header: KVHeader
    layers: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def encode(cache: KVCache) -> bytes:
    """Serialize a cache; arrays must already have the header's dtype and shape.

    The tensor bytes are copied once, straight into the message: the msgpack framing
    around the body is written by hand so that no intermediate body buffer is built.
    """
    header = cache.header
    _check_header_values(header.to_dict())
    if len(cache.layers) != header.num_layers:
        raise WireFormatError("num_layers", f"header declares {header.num_layers} layers, but the cache has {len(cache.layers)}")

    expected = DTYPES[header.dtype]
    chunks = [_message_prefix(header)]
    for index, (keys, values) in enumerate(cache.layers):
        for part, array in (("keys", keys), ("values", values)):
            if array.shape != header.layer_shape:
                raise WireFormatError("layers", f"layer {index} {part} has shape {array.shape}, "
                                      f"expected {header.layer_shape}")
            if array.dtype.itemsize != expected.itemsize or array.dtype.kind != expected.kind:
                raise WireFormatError("dtype", f"layer {index} {part} is {array.dtype}, but the header declares {header.dtype}")
            contiguous = np.ascontiguousarray(array, dtype=expected)
            chunks.append(memoryview(contiguous).cast("B") if contiguous.size else b"")
    return b"".join(chunks)


def _message_prefix(header: KVHeader) -> bytes:
    """Build the msgpack bytes before the body: a map of 2, "header" and its map, "body" and a bin header."""
    packer = msgpack.Packer(use_bin_type=True)
    size = header.body_size()
    if size < 1 << 8:
        bin_header = b"\xc4" + size.to_bytes(1, "big")
    elif size < 1 << 16:
        bin_header = b"\xc5" + size.to_bytes(2, "big")
    elif size < 1 << 32:
        bin_header = b"\xc6" + size.to_bytes(4, "big")
    else:
        raise WireFormatError("body", f"{size} bytes exceed msgpack's 4 GiB limit for one binary field")
    return (packer.pack_map_header(2) + packer.pack("header") + packer.pack(header.to_dict())
            + packer.pack("body") + bin_header)


def decode_header(message: bytes) -> tuple[KVHeader, memoryview]:
    """Parse and validate the header; return it with the body, a view into `message` (no copy)."""
    raw, body = _split_message(message)
    if not isinstance(raw, dict):
        raise WireFormatError("header", "expected a map")
    _check_header_values(raw)

    header = KVHeader(fingerprint=raw["fingerprint"], dtype=raw["dtype"], layer_kinds=list(raw["layer_kinds"]),
                      kv_heads=raw["kv_heads"], head_dim=raw["head_dim"], token_ids=list(raw["token_ids"]),
                      version=raw["version"], model=raw.get("model", ""))
    if body is None:
        raise WireFormatError("body", "expected bytes")
    if len(body) != header.body_size():
        raise WireFormatError("body", f"has {len(body)} bytes, header implies {header.body_size()} "
                              f"({header.num_layers} layers x 2 x {header.layer_shape} x {header.dtype}); "
                              "the message is truncated or its header is wrong")
    return header, body


def _split_message(message: bytes) -> tuple[object, memoryview | None]:
    """Return (raw header, body view); the body view is None when the body is not binary.

    Messages written by `encode` ("header" first, then "body") are parsed up to the body
    and the body is sliced in place; any other key order falls back to a full unpack.
    """
    view = memoryview(message)
    unpacker = msgpack.Unpacker(io.BytesIO(message), raw=False, strict_map_key=True, read_size=1 << 16)
    try:
        if unpacker.read_map_header() == 2 and unpacker.unpack() == "header":
            raw = unpacker.unpack()
            if unpacker.unpack() == "body":
                return raw, _read_bin(view, unpacker.tell())
    except msgpack.OutOfData:
        raise WireFormatError("message", "the message ends inside its header; it is truncated") from None
    except (msgpack.FormatError, msgpack.StackError, ValueError, TypeError):
        pass  # not in encode's layout: the full unpack below reports what is wrong

    try:
        unpacked = msgpack.unpackb(message, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise WireFormatError("message", f"not a valid msgpack document ({exc})") from None
    if not isinstance(unpacked, dict) or "header" not in unpacked or "body" not in unpacked:
        raise WireFormatError("message", "expected a map with keys 'header' and 'body'")
    body = unpacked["body"]
    return unpacked["header"], memoryview(body) if isinstance(body, bytes) else None


def _read_bin(view: memoryview, offset: int) -> memoryview | None:
    """Slice the msgpack binary field at `offset` out of `view`; None when it is not binary."""
    sizes = {0xC4: 1, 0xC5: 2, 0xC6: 4}
    if offset >= len(view) or view[offset] not in sizes:
        return None
    width = sizes[view[offset]]
    start = offset + 1 + width
    if start > len(view):
        raise WireFormatError("body", "the message ends inside the body's length field; it is truncated")
    size = int.from_bytes(view[offset + 1:start], "big")
    if start + size != len(view):
        raise WireFormatError("body", f"has {len(view) - start} bytes after its length field, which declares {size}; "
                              "the message is truncated or has trailing data")
    return view[start:start + size]


def decode(message: bytes) -> KVCache:
    """Deserialize a message produced by `encode`. Arrays are read-only views of the body."""
    header, body = decode_header(message)
    dtype = DTYPES[header.dtype]
    count = header.kv_heads * header.num_tokens * header.head_dim
    step = count * dtype.itemsize

    layers = []
    offset = 0
    for _ in range(header.num_layers):
        keys = np.frombuffer(body, dtype, count, offset).reshape(header.layer_shape)
        values = np.frombuffer(body, dtype, count, offset + step).reshape(header.layer_shape)
        layers.append((keys, values))
        offset += 2 * step
    return KVCache(header, layers)


def _check_header_values(raw: dict) -> None:
    version = raw.get("version")
    if version != FORMAT_VERSION:
        raise WireFormatError("version", f"unsupported format version {version!r}; this build reads {FORMAT_VERSION}")
    for name in ("fingerprint", "dtype"):
        if not isinstance(raw.get(name), str):
            raise WireFormatError(name, "missing or not a string")
    if raw["dtype"] not in DTYPES:
        raise WireFormatError("dtype", f"unknown dtype {raw['dtype']!r}; expected one of {sorted(DTYPES)}")
    for name in ("kv_heads", "head_dim", "num_layers"):
        value = raw.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise WireFormatError(name, f"must be a positive integer, got {value!r}")

    kinds = raw.get("layer_kinds")
    if not isinstance(kinds, list) or len(kinds) != raw["num_layers"]:
        raise WireFormatError("layer_kinds", f"expected a list of {raw['num_layers']} layer kinds")
    if unknown := sorted({k for k in kinds if k not in LAYER_KINDS}, key=str):
        raise WireFormatError("layer_kinds", f"unknown kinds {unknown}; expected {list(LAYER_KINDS)}")

    token_ids = raw.get("token_ids")
    if not isinstance(token_ids, list) or not all(isinstance(t, int) and t >= 0 for t in token_ids):
        raise WireFormatError("token_ids", "expected a list of non-negative integers")
    if raw.get("num_tokens", len(token_ids)) != len(token_ids):
        raise WireFormatError("num_tokens", f"says {raw.get('num_tokens')}, token_ids has {len(token_ids)}")
