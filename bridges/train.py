"""Train a bridge: both models frozen, only the fuser learns.

For each sample the prompt, except its last token, is prefilled by the receiver and
(on aligned tokens) by the sharer without gradients. The fuser turns both caches into
a fused receiver cache. The receiver then runs its last prompt token plus the response
tokens on that cache, and the next-token loss on the response tokens flows back
through the cache tensors into the fuser.

Samples are processed one at a time; `batch` samples are accumulated per optimizer
step, so prompts of any length need no padding. Caches are not precomputed: each
sample is seen about once in the default runs, and at about 36 KB per token for
Gemma 3 270M (float32) plus 46 KB for SmolLM2 135M they would not fit in memory.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cachetalk.bridges.align import SPECIAL, align_ids, label_tokens
from cachetalk.bridges.data import Sample
from cachetalk.bridges.fuser import Fuser, FuserConfig, terminal_layer_map
from cachetalk.bridges.store import fuser_state
from cachetalk.server.kv import build_cache, cache_layers, new_cache
from cachetalk.server.models import LoadedModel

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
PROMPT_HEAD_TOKENS = 48  # kept from the start of a truncated prompt: system turn and turn markers


@dataclass
class Encoded:
    """One sample tokenized for both models: equal-length id lists, the prompt is ids[:prompt_len]."""

    receiver_ids: list[int]
    sharer_ids: list[int]
    prompt_len: int
    answer_len: int  # response tokens before the turn-end marker


@dataclass
class TrainConfig:
    steps: int
    batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    clip: float = 1.0
    seed: int = 0
    val_every: int = 0
    checkpoint_every: int = 50
    max_prompt_tokens: int = 384
    temperature_start: float = 1.0
    temperature_end: float = 0.1


def truncate_prompt(ids: list[int], limit: int) -> list[int]:
    """Cut the middle of a long prompt, keeping its head (turn markers) and tail (question, options)."""
    if len(ids) <= limit:
        return ids
    head = min(PROMPT_HEAD_TOKENS, limit // 4)
    return ids[:head] + ids[len(ids) - (limit - head):]


def encode_sample(receiver: LoadedModel, sharer: LoadedModel, messages: list[dict],
                  max_prompt_tokens: int) -> Encoded:
    """Tokenize prompt and response with the receiver's template and align the sharer's tokens."""
    prompt_ids, _ = label_tokens(receiver.tokenizer, messages[:-1], add_generation_prompt=True)
    full_ids, labels = label_tokens(receiver.tokenizer, messages, add_generation_prompt=False)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently with a response appended; "
                         "cannot find the response tokens")
    sharer_full = align_ids(receiver.tokenizer, sharer.tokenizer, full_ids, labels)

    response_labels = labels[len(prompt_ids):]
    answer_len = response_labels.index(SPECIAL) if SPECIAL in response_labels else len(response_labels)
    keep = truncate_prompt(list(range(len(prompt_ids))), max_prompt_tokens) + \
        list(range(len(prompt_ids), len(full_ids)))
    return Encoded([full_ids[i] for i in keep], [sharer_full[i] for i in keep],
                   len(keep) - len(response_labels), answer_len)


@torch.no_grad()
def prefill_layers(lm: LoadedModel, token_ids: list[int]):
    """Prefill without gradients (not inference mode, so the fuser can train on the result).

    Only the cache is needed, so the LM head runs on the last position alone: for
    Gemma 3's 262k vocabulary it would otherwise cost about as much as the layers.
    """
    cache = new_cache()
    input_ids = torch.tensor([token_ids], device=lm.model.device)  # [1, tokens]
    positions = torch.arange(len(token_ids), device=lm.model.device).unsqueeze(0)
    lm.model(input_ids=input_ids, cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    return cache_layers(cache)


def fused_cache(fuser: Fuser | None, receiver: LoadedModel, sharer: LoadedModel | None, sample: Encoded):
    """Return the receiver's cache of the prompt except its last token, fused when a fuser is given."""
    context = sample.prompt_len - 1
    receiver_layers = prefill_layers(receiver, sample.receiver_ids[:context])
    if fuser is None:
        return build_cache(receiver_layers)
    if sharer is None:  # self bridge: the receiver is its own sharer
        sharer_layers = receiver_layers
    else:
        sharer_layers = prefill_layers(sharer, sample.sharer_ids[:context])
    return build_cache(fuser(receiver_layers, sharer_layers))


def response_log_probs(receiver: LoadedModel, cache, sample: Encoded, count: int) -> torch.Tensor:
    """Log-probabilities [count] of the first `count` response tokens, run on the prompt cache."""
    start = sample.prompt_len - 1
    tokens = sample.receiver_ids[start:sample.prompt_len + count]
    input_ids = torch.tensor([tokens], device=receiver.model.device)  # [1, 1 + count]
    positions = torch.arange(start, start + len(tokens), device=receiver.model.device).unsqueeze(0)
    logits = receiver.model(input_ids=input_ids, cache=cache, position_ids=positions, use_cache=True).logits
    log_probs = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # [count, vocab]
    targets = input_ids[0, 1:]
    return log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)


def sample_loss(fuser: Fuser, receiver: LoadedModel, sharer: LoadedModel | None, sample: Encoded) -> torch.Tensor:
    cache = fused_cache(fuser, receiver, sharer, sample)
    count = len(sample.receiver_ids) - sample.prompt_len
    return -response_log_probs(receiver, cache, sample, count).mean()


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup over the first `warmup` fraction of steps, then cosine decay to 10%."""
    warmup = max(1, int(config.warmup * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def gate_temperature(config: TrainConfig, step: int) -> float:
    """Anneal the Gumbel-sigmoid temperature geometrically from start to end."""
    fraction = step / max(1, config.steps - 1)
    return config.temperature_start * (config.temperature_end / config.temperature_start) ** fraction


def sample_order(count: int, seed: int, position: int) -> int:
    """Index of the sample at `position` of the training stream: a fresh permutation per epoch."""
    epoch, offset = divmod(position, count)
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[offset]


def new_fuser(receiver: LoadedModel, sharer: LoadedModel, hidden: int, depth: int) -> Fuser:
    config = FuserConfig(receiver.num_layers, receiver.num_kv_heads, receiver.head_dim,
                         sharer.num_layers, sharer.num_kv_heads, sharer.head_dim, hidden=hidden, depth=depth)
    return Fuser(config, terminal_layer_map(receiver.num_layers, sharer.num_layers))


def save_checkpoint(folder: Path, fuser: Fuser, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write weights, optimizer tensors and RNG state as safetensors, counters as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(fuser_state(fuser), str(folder / "fuser.safetensors"))
    tensors = {"rng": torch.get_rng_state()}
    scalars = {}
    for index, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "state.json").write_text(json.dumps({**state, "optimizer_scalars": scalars}, indent=2))


def load_checkpoint(folder: Path, fuser: Fuser, optimizer: torch.optim.Optimizer) -> dict:
    fuser.load_state_dict(load_file(str(folder / "fuser.safetensors")))
    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng"))

    saved = optimizer.state_dict()
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    for name, value in state.pop("optimizer_scalars").items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    saved["state"] = per_param
    optimizer.load_state_dict(saved)
    return state


@torch.no_grad()
def validation_loss(fuser: Fuser, receiver: LoadedModel, sharer: LoadedModel | None,
                    samples: list[Encoded]) -> float:
    fuser.eval()
    losses = [sample_loss(fuser, receiver, sharer, s).item() for s in samples]
    fuser.train()
    return sum(losses) / max(1, len(losses))


def train(fuser: Fuser, receiver: LoadedModel, sharer: LoadedModel | None, samples: list[Encoded],
          config: TrainConfig, out: Path, validation: list[Encoded] = (), resume: bool = False,
          until: int | None = None) -> dict:
    """Train `fuser` in place; `sharer` None trains a self bridge. Returns the run summary.

    Checkpoints go to `out/checkpoint` every `checkpoint_every` steps and when the run
    stops. `until` stops after that step, leaving the rest to a later `resume`.
    """
    if not samples:
        raise ValueError("no training samples")
    torch.manual_seed(config.seed)
    fuser.train()
    optimizer = torch.optim.AdamW(fuser.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = {"step": 0, "position": 0, "losses": [], "validation": [], "seconds": 0.0}
    if resume and (out / CHECKPOINT / "state.json").exists():
        state = load_checkpoint(out / CHECKPOINT, fuser, optimizer)
        logger.info("resumed from %s at step %d", out / CHECKPOINT, state["step"])

    started = time.perf_counter() - state["seconds"]
    bar = tqdm(total=config.steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    last = min(config.steps, until or config.steps)
    while state["step"] < last:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        fuser.temperature = gate_temperature(config, step)

        step_started, total = time.perf_counter(), 0.0
        for _ in range(config.batch):
            sample = samples[sample_order(len(samples), config.seed, state["position"])]
            state["position"] += 1
            loss = sample_loss(fuser, receiver, sharer, sample)
            (loss / config.batch).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(fuser.parameters(), config.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        state["step"] += 1
        state["losses"].append(total / config.batch)
        rate = config.batch / (time.perf_counter() - step_started)
        bar.set_postfix(loss=f"{total / config.batch:.3f}", samples_per_s=f"{rate:.2f}")
        bar.update(1)
        if validation and config.val_every and state["step"] % config.val_every == 0:
            val = validation_loss(fuser, receiver, sharer, list(validation))
            state["validation"].append([state["step"], val])
            bar.write(f"step {state['step']}: validation loss {val:.4f}")
        state["seconds"] = time.perf_counter() - started
        if state["step"] % config.checkpoint_every == 0 or state["step"] == last:
            save_checkpoint(out / CHECKPOINT, fuser, optimizer, state)
    bar.close()
    return state
