"""The C2C fuser: a learned update of the receiver's KV cache from the sharer's KV cache.

Method of Fu et al., "Cache-to-Cache: Direct Semantic Communication Between Large
Language Models" (arXiv 2510.03215). For every receiver layer `t`, keys and values
each get their own projector, which reads the sharer layer `layer_map[t]`:

    C_fused = C_recv + gate * sigmoid(w) * P([C_recv ; C_sharer])

- `P`: per token, flatten each cache's heads, normalise each side, concatenate,
  a linear layer into `hidden`, `depth` pre-norm residual MLP blocks, a linear layer
  back to the receiver's `kv_heads * head_dim`.
- `w`: one logit per token and receiver KV head, read from the same hidden state.
- `gate`: one learned logit per layer for keys and one for values. Training samples
  a Gumbel-sigmoid (relaxed Bernoulli) with a temperature that the trainer anneals.
  Inference uses the hard test `logit > 0`. A closed gate skips the projector and
  returns the receiver's tensor itself.

The receiver's keys carry RoPE of the receiver's positions and the sharer's keys carry
the sharer's RoPE; both are concatenated as they are, as the reference code does.
The output layer of `P` starts at zero, so an untrained bridge returns the receiver's
cache unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

# Per layer: (keys, values), each [batch, kv_heads, tokens, head_dim].
Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FuserConfig:
    receiver_layers: int
    receiver_kv_heads: int
    receiver_head_dim: int
    sharer_layers: int
    sharer_kv_heads: int
    sharer_head_dim: int
    hidden: int = 128
    depth: int = 1
    dropout: float = 0.1
    gate_init: float = 1.0  # gate logit at start: open, sigmoid(1.0) = 0.73 at temperature 1

    def to_dict(self) -> dict:
        return asdict(self)


def terminal_layer_map(receiver_layers: int, sharer_layers: int) -> list[int]:
    """Align the last layers: receiver layer t reads sharer layer (L_sharer - L_recv) + t, clamped."""
    offset = sharer_layers - receiver_layers
    return [min(max(offset + t, 0), sharer_layers - 1) for t in range(receiver_layers)]


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, width)
        self.down = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.down(nn.functional.gelu(self.up(self.norm(x)))))


class Projector(nn.Module):
    """P and w for one tensor kind (keys or values) of one receiver layer."""

    def __init__(self, config: FuserConfig):
        super().__init__()
        receiver_width = config.receiver_kv_heads * config.receiver_head_dim
        sharer_width = config.sharer_kv_heads * config.sharer_head_dim
        self.receiver_heads = config.receiver_kv_heads
        self.receiver_norm = nn.LayerNorm(receiver_width)
        self.sharer_norm = nn.LayerNorm(sharer_width)
        self.into_hidden = nn.Linear(receiver_width + sharer_width, config.hidden)
        self.blocks = nn.ModuleList(ResidualBlock(config.hidden, config.dropout) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(config.hidden)
        self.out = nn.Linear(config.hidden, receiver_width)
        self.weight = nn.Linear(config.hidden, config.receiver_kv_heads)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, receiver: torch.Tensor, sharer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the update P [batch, kv_heads, tokens, head_dim] and sigmoid(w) [batch, kv_heads, tokens, 1]."""
        batch, heads, tokens, head_dim = receiver.shape
        r = receiver.transpose(1, 2).reshape(batch, tokens, -1)  # [batch, tokens, kv_heads * head_dim]
        s = sharer.transpose(1, 2).reshape(batch, tokens, -1)  # [batch, tokens, sharer_kv_heads * sharer_head_dim]
        x = torch.cat([self.receiver_norm(r), self.sharer_norm(s)], dim=-1)
        h = self.into_hidden(x)  # [batch, tokens, hidden]
        for block in self.blocks:
            h = block(h)
        h = self.out_norm(h)

        update = self.out(h).reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # [batch, kv_heads, tokens, head_dim]
        weight = torch.sigmoid(self.weight(h)).transpose(1, 2).unsqueeze(-1)  # [batch, kv_heads, tokens, 1]
        return update, weight


class Fuser(nn.Module):
    """One key projector and one value projector per receiver layer, plus their gates.

    Example:
        >>> config = FuserConfig(30, 3, 64, 18, 1, 256)
        >>> fuser = Fuser(config, terminal_layer_map(30, 18))
        >>> fused = fuser(receiver_layers, sharer_layers)  # same shapes as receiver_layers
    """

    def __init__(self, config: FuserConfig, layer_map: list[int]):
        super().__init__()
        if len(layer_map) != config.receiver_layers:
            raise ValueError(f"layer map has {len(layer_map)} entries but the receiver has "
                             f"{config.receiver_layers} layers")
        if any(not 0 <= s < config.sharer_layers for s in layer_map):
            raise ValueError(f"layer map {layer_map} names a layer outside the sharer's "
                             f"0..{config.sharer_layers - 1}")
        self.config = config
        self.layer_map = list(layer_map)
        self.key_projectors = nn.ModuleList(Projector(config) for _ in range(config.receiver_layers))
        self.value_projectors = nn.ModuleList(Projector(config) for _ in range(config.receiver_layers))
        # [receiver_layers, 2]: gate logits for keys (column 0) and values (column 1).
        self.gate_logits = nn.Parameter(torch.full((config.receiver_layers, 2), config.gate_init))
        self.temperature = 1.0  # Gumbel-sigmoid temperature, set by the trainer

    def gates(self) -> torch.Tensor:
        """Gate values [receiver_layers, 2]: relaxed samples in training, 0 or 1 at inference."""
        if not self.training:
            return (self.gate_logits > 0).to(self.gate_logits.dtype)
        u = torch.rand_like(self.gate_logits).clamp(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)  # logistic noise
        return torch.sigmoid((self.gate_logits + noise) / self.temperature)

    def open_layers(self) -> list[tuple[bool, bool]]:
        """Per receiver layer, whether the key and value gates are open at inference."""
        return [(bool(k > 0), bool(v > 0)) for k, v in self.gate_logits.detach().tolist()]

    def fuse_tensor(self, projector: Projector, gate: torch.Tensor, receiver: torch.Tensor,
                    sharer: torch.Tensor) -> torch.Tensor:
        if not self.training and gate.item() == 0:
            return receiver
        update, weight = projector(receiver.to(gate.dtype), sharer.to(gate.dtype))
        return receiver + (gate * weight * update).to(receiver.dtype)

    def forward(self, receiver_layers: Layers, sharer_layers: Layers) -> Layers:
        """Fuse per-layer caches of the same tokens; returns layers shaped like `receiver_layers`."""
        self._check_shapes(receiver_layers, sharer_layers)
        gates = self.gates()
        fused = []
        for t, (keys, values) in enumerate(receiver_layers):
            sharer_keys, sharer_values = sharer_layers[self.layer_map[t]]
            fused.append((
                self.fuse_tensor(self.key_projectors[t], gates[t, 0], keys, sharer_keys),
                self.fuse_tensor(self.value_projectors[t], gates[t, 1], values, sharer_values),
            ))
        return fused

    def _check_shapes(self, receiver_layers: Layers, sharer_layers: Layers) -> None:
        c = self.config
        if len(receiver_layers) != c.receiver_layers or len(sharer_layers) != c.sharer_layers:
            raise ValueError(f"bridge expects {c.receiver_layers} receiver and {c.sharer_layers} sharer layers, "
                             f"got {len(receiver_layers)} and {len(sharer_layers)}; was it trained for this pair?")
        r_keys, s_keys = receiver_layers[0][0], sharer_layers[0][0]
        if tuple(r_keys.shape[1::2]) != (c.receiver_kv_heads, c.receiver_head_dim):
            raise ValueError(f"receiver cache has kv_heads, head_dim {tuple(r_keys.shape[1::2])}, "
                             f"bridge expects {(c.receiver_kv_heads, c.receiver_head_dim)}")
        if tuple(s_keys.shape[1::2]) != (c.sharer_kv_heads, c.sharer_head_dim):
            raise ValueError(f"sharer cache has kv_heads, head_dim {tuple(s_keys.shape[1::2])}, "
                             f"bridge expects {(c.sharer_kv_heads, c.sharer_head_dim)}")
        if r_keys.shape[2] != s_keys.shape[2]:
            raise ValueError(f"receiver cache contains {r_keys.shape[2]} tokens and sharer cache {s_keys.shape[2]}; "
                             "align the tokens first (cachetalk.bridges.align.align_tokens)")
