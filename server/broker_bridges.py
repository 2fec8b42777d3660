"""Bridges the broker applies, and the torch side of c2c: wire format <-> layers, fusion.

The broker has no model loaded, so it converts KV caches between the wire format and
torch tensors by the header alone (dtype, layers, KV heads, head_dim).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from cachetalk.bridges.store import WEIGHTS, Bridge, BridgeMismatchError, load_bridge
from cachetalk.client.wire import KVCache, KVHeader
from cachetalk.server.broker_config import ConfigError, find_bridge_folders
from cachetalk.server.errors import APIError
from cachetalk.server.kv import wire_arrays

logger = logging.getLogger(__name__)

# Per layer: (keys, values), each [1, kv_heads, tokens, head_dim].
Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RegisteredBridge:
    name: str  # the folder name, e.g. "gemma3-270m-to-smollm2-135m"
    folder: Path
    bridge: Bridge

    @property
    def sharer(self) -> str:
        return self.bridge.card["sharer"]

    @property
    def receiver(self) -> str:
        return self.bridge.card["receiver"]

    @property
    def pair(self) -> str:
        return f"{self.sharer}->{self.receiver}"

    def fits(self, sharer: dict, receiver: dict) -> bool:
        """Return whether the bridge was trained for these agents' models (by fingerprint)."""
        card = self.bridge.card
        return (card.get("sharer_fingerprint"), card.get("receiver_fingerprint")) == (
            sharer.get("fingerprint"), receiver.get("fingerprint"))

    def summary(self) -> dict:
        """Return the card as `/v1/bridges` lists it: pair, fingerprints, size and evaluation summary."""
        card = self.bridge.card
        evaluations = card.get("evaluation") or []
        keys = ("data", "split", "limit", "overall")
        return {
            "name": self.name,
            "sharer": self.sharer,
            "receiver": self.receiver,
            "sharer_fingerprint": card.get("sharer_fingerprint"),
            "receiver_fingerprint": card.get("receiver_fingerprint"),
            "parameters": card.get("parameters") or _count_parameters(self.folder / WEIGHTS),
            "size_bytes": (self.folder / WEIGHTS).stat().st_size,
            "dtype": card.get("dtype"),
            "hidden": card.get("hidden"),
            "depth": card.get("depth"),
            "layer_map": card.get("layer_map"),
            "open_gates": card.get("open_gates"),
            "self_bridge": card.get("self_bridge", False),
            "eval": [{key: e.get(key) for key in keys} for e in evaluations if isinstance(e, dict)] or None,
            "path": str(self.folder),
        }


def _count_parameters(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as f:
        return sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())


class BridgeRegistry:
    """The bridges of the config, by name, in config order (the first that fits a pair is its default)."""

    def __init__(self, bridges: list[RegisteredBridge]):
        self.bridges = {b.name: b for b in bridges}

    @classmethod
    def load(cls, paths: list[Path]) -> BridgeRegistry:
        loaded = []
        for folder in find_bridge_folders(paths):
            try:
                bridge = load_bridge(folder)
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(f"cannot load the bridge in {folder}: {exc}") from exc
            loaded.append(RegisteredBridge(folder.name, folder, bridge))
            logger.info("loaded bridge %s (%s) from %s", folder.name, loaded[-1].pair, folder)
        return cls(loaded)

    def describe(self) -> str:
        return ", ".join(f"{b.name} ({b.pair})" for b in self.bridges.values()) or "none"

    def choose(self, sharer_name: str, sharer: dict, receiver_name: str, receiver: dict,
               requested: str | None) -> RegisteredBridge | None:
        """Pick the bridge for a sharer and receiver, or None when the sharer serves the receiver's model.

        The `requested` bridge wins for the pair it was trained for; other pairs get their
        default. Raises a 400 APIError for an unknown name or when no bridge fits the pair.
        """
        if requested is not None:
            chosen = self.bridges.get(requested)
            if chosen is None:
                raise APIError(400, f"unknown bridge {requested!r}; bridges loaded: {self.describe()}",
                               param="cachetalk.bridge", code="bridge_not_found")
            if chosen.fits(sharer, receiver):
                return chosen

        if sharer.get("fingerprint") == receiver.get("fingerprint"):
            return None
        for candidate in self.bridges.values():
            if candidate.fits(sharer, receiver):
                return candidate
        # By model name, for a bridge whose fingerprints do not match: `check` then raises
        # an error that gives both fingerprints.
        for candidate in self.bridges.values():
            if (candidate.sharer, candidate.receiver) == (sharer.get("id"), receiver.get("id")):
                self.check(candidate, sharer_name, sharer, receiver_name, receiver)
                return candidate
        raise APIError(400, f"no bridge for the pair {sharer_name}->{receiver_name} (sharer -> receiver); "
                       f"bridges loaded: {self.describe()}. Use mode t2t, or train a bridge with "
                       "`cachetalk bridge train`", param="cachetalk.sharers", code="bridge_not_found")

    @staticmethod
    def check(chosen: RegisteredBridge, sharer_name: str, sharer: dict, receiver_name: str, receiver: dict) -> None:
        try:
            chosen.bridge.check(sharer.get("fingerprint"), receiver.get("fingerprint"))
        except BridgeMismatchError as exc:
            raise APIError(400, f"bridge {chosen.name} does not fit sharer {sharer_name} and receiver "
                           f"{receiver_name}: {exc}", param="cachetalk.bridge", code="bridge_mismatch") from None


def layers_to_wire(template: KVHeader, layers: Layers) -> KVCache:
    """Turn receiver layers back into a wire-format cache with the header of `template` (same model, tokens)."""
    header = KVHeader(fingerprint=template.fingerprint, dtype=template.dtype, layer_kinds=list(template.layer_kinds),
                      kv_heads=template.kv_heads, head_dim=template.head_dim, token_ids=list(template.token_ids),
                      model=template.model)
    return KVCache(header, wire_arrays(layers, template.dtype))


def fuse_in_order(receiver_layers: Layers, sharers: list[tuple[RegisteredBridge, Layers]]) -> Layers:
    """Apply one bridge per sharer in turn; the output of one fusion is the receiver cache of the next."""
    for registered, sharer_layers in sharers:
        receiver_layers = registered.bridge.fuse(receiver_layers, sharer_layers)
    return receiver_layers
