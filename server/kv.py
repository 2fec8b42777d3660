"""Prefill a prompt and move its KV cache between torch and the wire format."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from cachetalk.client.wire import KVCache, KVHeader
from cachetalk.server.models import LoadedModel

# Per layer: (keys, values), each [batch, kv_heads, tokens, head_dim].
Layers = list[tuple[torch.Tensor, torch.Tensor]]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIRE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


class CacheMismatchError(ValueError):
    """A KV cache that does not belong to the model it was sent to; `field` names the mismatch."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def new_cache() -> DynamicCache:
    # A plain DynamicCache keeps every position on every layer, sliding-window layers
    # included; the attention mask still applies the window. Fusion needs all positions.
    return DynamicCache()


@torch.inference_mode()
def prefill(lm: LoadedModel, token_ids: list[int], cache: DynamicCache | None = None):
    """Run the prompt through the model; return (cache, logits of the last position)."""
    cache = cache if cache is not None else new_cache()
    if not token_ids:
        return cache, None
    input_ids = torch.tensor([token_ids], device=lm.model.device)  # [1, tokens]
    past = cache.get_seq_length()
    positions = torch.arange(past, past + len(token_ids), device=lm.model.device).unsqueeze(0)
    # logits_to_keep=1: only the last position feeds sampling, and the LM head over every
    # prompt position costs as much as the layers for a large vocabulary (Gemma 3: 262k).
    out = lm.model(input_ids=input_ids, cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[0, -1]


def cache_layers(cache: DynamicCache) -> Layers:
    return [(layer.keys, layer.values) for layer in cache.layers]


def build_cache(layers: Layers) -> DynamicCache:
    cache = new_cache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def wire_arrays(layers: Layers, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Copy torch layers of one sequence into wire-format arrays `[kv_heads, tokens, head_dim]` of `dtype`."""
    target = TORCH_DTYPES[dtype]
    arrays = []
    for keys, values in layers:
        pair = []
        for tensor in (keys, values):
            tensor = tensor[0].detach().to("cpu", target).contiguous()  # [kv_heads, tokens, head_dim]
            if target == torch.bfloat16:
                pair.append(tensor.view(torch.int16).numpy().view(np.uint16))
            else:
                pair.append(tensor.numpy())
        arrays.append((pair[0], pair[1]))
    return arrays


def wire_layers(kv: KVCache) -> Layers:
    """Copy a decoded wire-format cache into CPU tensors `[1, kv_heads, tokens, head_dim]` of its own dtype."""
    source = TORCH_DTYPES[kv.header.dtype]
    layers = []
    for keys, values in kv.layers:
        pair = []
        for array in (keys, values):
            if source == torch.bfloat16:
                tensor = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
            else:
                tensor = torch.from_numpy(array.copy())
            pair.append(tensor.unsqueeze(0))
        layers.append((pair[0], pair[1]))
    return layers


def to_wire(lm: LoadedModel, layers: Layers, token_ids: list[int], dtype: str | None = None) -> KVCache:
    """Convert torch layers of one sequence into a wire-format cache (default: the model's dtype)."""
    dtype = dtype or WIRE_NAMES[lm.dtype]
    header = KVHeader(fingerprint=lm.fingerprint, dtype=dtype, layer_kinds=lm.layer_kinds,
                      kv_heads=lm.num_kv_heads, head_dim=lm.head_dim, token_ids=list(token_ids), model=lm.name)
    return KVCache(header, wire_arrays(layers, dtype))


def check_compatible(lm: LoadedModel, header: KVHeader, allow_cast: bool = False) -> None:
    """Raise CacheMismatchError when a cache header does not describe this model.

    A dtype other than the model's is a mismatch unless `allow_cast` is set, for a
    sender that chose a narrower dtype on the wire on purpose.
    """
    expected = {
        "fingerprint": lm.fingerprint,
        "num_layers": lm.num_layers,
        "kv_heads": lm.num_kv_heads,
        "head_dim": lm.head_dim,
    }
    actual = {
        "fingerprint": header.fingerprint,
        "num_layers": header.num_layers,
        "kv_heads": header.kv_heads,
        "head_dim": header.head_dim,
    }
    for field, value in expected.items():
        if actual[field] != value:
            raise CacheMismatchError(field, f"KV cache {field} is {actual[field]!r} but model {lm.name} has "
                                     f"{value!r}; was the cache exported by another model?")
    if header.dtype != WIRE_NAMES[lm.dtype] and not allow_cast:
        raise CacheMismatchError("dtype", f"KV cache dtype is {header.dtype} but model {lm.name} runs in "
                                 f"{WIRE_NAMES[lm.dtype]}; export the cache with dtype {WIRE_NAMES[lm.dtype]}")
    if header.num_tokens and max(header.token_ids) >= lm.config.vocab_size:
        raise CacheMismatchError("token_ids", f"KV cache holds token id {max(header.token_ids)}, outside the "
                                 f"vocabulary of {lm.name} ({lm.config.vocab_size} tokens)")


def from_wire(lm: LoadedModel, kv: KVCache, allow_cast: bool = False) -> Layers:
    """Validate a wire-format cache against the model and convert it into torch layers on its device."""
    check_compatible(lm, kv.header, allow_cast)
    return [(k.to(lm.model.device, lm.dtype), v.to(lm.model.device, lm.dtype)) for k, v in wire_layers(kv)]
