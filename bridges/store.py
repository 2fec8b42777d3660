"""A bridge on disk: a folder with `bridge.safetensors` (weights) and `bridge.json` (card).

Weights are stored in float16 (or bfloat16) to keep shipped bridges small and load
into float32. Nothing here unpickles: tensors travel as safetensors, the rest as JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cachetalk.bridges.fuser import Fuser, FuserConfig, Layers

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "bridge.safetensors"
CARD = "bridge.json"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class BridgeMismatchError(ValueError):
    """A bridge applied to models other than the pair it was trained for."""


class BridgeFormatError(ValueError):
    """A bridge folder this version cannot read."""


def default_bridge_dir() -> Path:
    """Return the folder of the bridges shipped in the repository (`bridges/trained`)."""
    return Path(__file__).resolve().parent / "trained"


class Bridge:
    """A trained fuser with its card.

    Example:
        >>> bridge = load_bridge(default_bridge_dir() / "gemma3-270m-to-smollm2-135m")
        >>> bridge.check(sharer.fingerprint, receiver.fingerprint)
        >>> fused_layers = bridge.fuse(receiver_layers, sharer_layers)
    """

    def __init__(self, fuser: Fuser, card: dict):
        self.fuser = fuser.eval()
        self.card = card

    @property
    def name(self) -> str:
        return f"{self.card['sharer']}->{self.card['receiver']}"

    def check(self, sharer_fingerprint: str, receiver_fingerprint: str) -> None:
        """Raise BridgeMismatchError unless both fingerprints are the ones the bridge was trained on."""
        expected = (self.card["sharer_fingerprint"], self.card["receiver_fingerprint"])
        if (sharer_fingerprint, receiver_fingerprint) != expected:
            raise BridgeMismatchError(
                f"bridge {self.name} was trained for sharer {self.card['sharer']} (fingerprint {expected[0]}) "
                f"and receiver {self.card['receiver']} (fingerprint {expected[1]}), but got sharer fingerprint "
                f"{sharer_fingerprint} and receiver fingerprint {receiver_fingerprint}; "
                "use a bridge trained for this pair")

    def fuse(self, receiver_layers: Layers, sharer_layers: Layers) -> Layers:
        """Fuse per-layer caches `[(k, v)]`, each `[1, kv_heads, tokens, head_dim]`, of aligned tokens."""
        with torch.inference_mode():
            return self.fuser(receiver_layers, sharer_layers)


def fuser_state(fuser: Fuser, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in fuser.state_dict().items()}


def save_bridge(folder: str | Path, fuser: Fuser, card: dict, dtype: str = "float16") -> Path:
    """Write the weights (in `dtype`) and the card; the card gains the format and dimension fields."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = fuser.config
    card = dict(card)
    card.update({
        "format_version": FORMAT_VERSION,
        "layer_map": fuser.layer_map,
        "receiver_layers": config.receiver_layers,
        "receiver_kv_heads": config.receiver_kv_heads,
        "receiver_head_dim": config.receiver_head_dim,
        "sharer_layers": config.sharer_layers,
        "sharer_kv_heads": config.sharer_kv_heads,
        "sharer_head_dim": config.sharer_head_dim,
        "hidden": config.hidden,
        "depth": config.depth,
        "dropout": config.dropout,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in fuser.parameters()),
        "open_gates": sum(k + v for k, v in fuser.open_layers()),
    })

    weights = folder / WEIGHTS
    save_file(fuser_state(fuser, STORAGE_DTYPES[dtype]), str(weights), metadata={"format_version": str(FORMAT_VERSION)})
    card["size_bytes"] = weights.stat().st_size
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    logger.info("saved bridge %s->%s into %s (%d bytes)", card.get("sharer"), card.get("receiver"),
                folder, card["size_bytes"])
    return folder


def update_card(folder: str | Path, **fields) -> dict:
    """Merge fields into a saved bridge's card (for example evaluation results)."""
    path = Path(folder) / CARD
    card = json.loads(path.read_text())
    card.update(fields)
    path.write_text(json.dumps(card, indent=2) + "\n")
    return card


def config_from_card(card: dict) -> FuserConfig:
    return FuserConfig(
        receiver_layers=card["receiver_layers"], receiver_kv_heads=card["receiver_kv_heads"],
        receiver_head_dim=card["receiver_head_dim"], sharer_layers=card["sharer_layers"],
        sharer_kv_heads=card["sharer_kv_heads"], sharer_head_dim=card["sharer_head_dim"],
        hidden=card["hidden"], depth=card["depth"], dropout=card.get("dropout", 0.1),
    )


def load_bridge(folder: str | Path) -> Bridge:
    """Load a bridge folder into float32, in evaluation mode."""
    folder = Path(folder)
    card_path = folder / CARD
    if not card_path.exists():
        raise FileNotFoundError(f"no {CARD} in {folder}; is it a bridge folder?")
    card = json.loads(card_path.read_text())
    version = card.get("format_version")
    if version != FORMAT_VERSION:
        raise BridgeFormatError(f"bridge {folder} has format version {version}, this cachetalk reads "
                                f"version {FORMAT_VERSION}; retrain it or use a matching cachetalk")

    fuser = Fuser(config_from_card(card), card["layer_map"])
    state = {name: tensor.to(torch.float32) for name, tensor in load_file(str(folder / WEIGHTS)).items()}
    fuser.load_state_dict(state)
    return Bridge(fuser, card)
