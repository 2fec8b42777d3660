"""KV wire-format throughput: encode plus decode of a model-shaped cache against a plain memory copy.

The payload is random data of the model's cache shape, because serialization speed
does not depend on the values. The reference is one `np.copyto` of the same number of
bytes between two preallocated buffers: the cheapest way to move the body once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cachetalk.benchmarks.stats import percentile, ratio
from cachetalk.client.wire import DTYPES, KVCache, KVHeader, decode, encode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """The KV cache geometry of one model: what decides the size of its wire messages."""

    name: str
    layer_kinds: tuple[str, ...]
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @classmethod
    def from_loaded(cls, lm) -> ModelShape:
        """Read the shape of a `cachetalk.server.models.LoadedModel`."""
        dtype = str(lm.dtype).removeprefix("torch.")
        return cls(lm.name, tuple(lm.layer_kinds), lm.num_kv_heads, lm.head_dim, dtype)

    @classmethod
    def from_model_entry(cls, entry: dict) -> ModelShape:
        """Read the shape from one entry of an agent's `GET /v1/models` list."""
        return cls(entry["id"], tuple(entry["layer_kinds"]), entry["kv_heads"], entry["head_dim"],
                   entry.get("dtype", "float32"))

    def bytes_per_token(self) -> int:
        return 2 * len(self.layer_kinds) * self.kv_heads * self.head_dim * DTYPES[self.dtype].itemsize


def random_cache(shape: ModelShape, tokens: int, seed: int = 0) -> KVCache:
    """Build a cache of `tokens` positions filled with random values of the model's shape."""
    rng = np.random.default_rng(seed)
    header = KVHeader(fingerprint="benchmark", dtype=shape.dtype, layer_kinds=list(shape.layer_kinds),
                      kv_heads=shape.kv_heads, head_dim=shape.head_dim, token_ids=[0] * tokens, model=shape.name)
    storage = DTYPES[shape.dtype]
    layers = []
    for _ in shape.layer_kinds:
        # keys and values: [kv_heads, tokens, head_dim]
        pair = [rng.random((shape.kv_heads, tokens, shape.head_dim), dtype=np.float32) for _ in range(2)]
        if storage.kind == "u":  # bfloat16 travels as its raw 16-bit pattern
            pair = [(array.view(np.uint32) >> 16).astype(storage) for array in pair]
        else:
            pair = [array.astype(storage, copy=False) for array in pair]
        layers.append((pair[0], pair[1]))
    return KVCache(header, layers)


def median_seconds(step: Callable[[], object], repeats: int) -> float:
    """Run `step` once to warm up, then `repeats` times; return the median wall time in seconds."""
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return percentile(times, 50)


def measure_size(shape: ModelShape, tokens: int, repeats: int) -> dict:
    """Time encode, decode and a plain copy of one cache size; throughputs are in GB/s."""
    cache = random_cache(shape, tokens)
    message = encode(cache)
    body_bytes = shape.bytes_per_token() * tokens

    source = np.frombuffer(np.random.default_rng(1).bytes(body_bytes), dtype=np.uint8)
    target = np.empty_like(source)

    encode_s = median_seconds(lambda: encode(cache), repeats)
    decode_s = median_seconds(lambda: decode(message), repeats)
    memcpy_s = median_seconds(lambda: np.copyto(target, source), repeats)
    round_trip_s = encode_s + decode_s
    return {
        "model": shape.name,
        "tokens": tokens,
        "bytes": body_bytes,
        "message_bytes": len(message),
        "encode_ms": encode_s * 1e3,
        "decode_ms": decode_s * 1e3,
        "memcpy_ms": memcpy_s * 1e3,
        "encode_decode_gb_per_s": body_bytes / round_trip_s / 1e9,
        "memcpy_gb_per_s": body_bytes / memcpy_s / 1e9,
        "ratio_to_memcpy": ratio(memcpy_s, round_trip_s),
    }


def profile_encode_decode(shape: ModelShape, tokens: int, repeats: int) -> dict[str, float]:
    """Time encode and decode beside reference copies of the same bytes (ms), to show where the time goes.

    `encode` copies each array once, straight into the new message, and `decode` reads
    the body in place (its arrays are views). The references: one copy into a buffer
    that was written before (`memcpy`), one copy into newly allocated numpy memory, and
    one join of the arrays into a new bytes object, which is what encode must return.
    Newly allocated memory pays a page fault per page on first touch.
    """
    cache = random_cache(shape, tokens)
    message = encode(cache)
    views = [memoryview(array).cast("B") for pair in cache.layers for array in pair]
    source = np.frombuffer(b"".join(views), dtype=np.uint8)
    target = np.empty_like(source)

    steps = {
        "encode_ms": lambda: encode(cache),
        "decode_ms": lambda: decode(message),
        "reference_memcpy_ms": lambda: np.copyto(target, source),
        "reference_copy_to_new_memory_ms": lambda: source.copy(),
        "reference_join_to_new_bytes_ms": lambda: b"".join(views),
    }
    return {name: median_seconds(run_step, repeats) * 1e3 for name, run_step in steps.items()}


def token_counts(smallest: int, largest: int) -> list[int]:
    """Return the powers of two from `smallest` to `largest` inclusive."""
    counts = []
    tokens = smallest
    while tokens <= largest:
        counts.append(tokens)
        tokens *= 2
    return counts


def run_wire_benchmark(shapes: list[ModelShape], max_tokens: int, repeats: int, min_tokens: int = 128) -> dict:
    """Measure every model shape at every cache size; summarize the ratio to memcpy.

    The summary `ratio_to_memcpy` is the median over all (model, size) points, and
    `ratio_to_memcpy_at_largest` is the worst model at the largest size, where fixed
    per-message costs matter least.
    """
    points = []
    for shape in shapes:
        for tokens in token_counts(min_tokens, max_tokens):
            point = measure_size(shape, tokens, repeats)
            logger.info("wire %s %d tokens: %.1f MB, encode %.1f ms, decode %.1f ms, memcpy %.1f ms, ratio %.2f",
                        shape.name, tokens, point["bytes"] / 1e6, point["encode_ms"], point["decode_ms"],
                        point["memcpy_ms"], point["ratio_to_memcpy"])
            points.append(point)

    largest = [p for p in points if p["tokens"] == max(p2["tokens"] for p2 in points)]
    profile = {shape.name: profile_encode_decode(shape, largest[0]["tokens"], repeats) for shape in shapes}
    return {
        "points": points,
        "ratio_to_memcpy": percentile([p["ratio_to_memcpy"] for p in points], 50),
        "ratio_to_memcpy_at_largest": min(p["ratio_to_memcpy"] for p in largest),
        "profile_at_largest": profile,
        "repeats": repeats,
    }
