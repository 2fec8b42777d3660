"""Token-by-token decoding from a KV cache, with sampling and stop strings."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from cachetalk.server.kv import prefill
from cachetalk.server.models import LoadedModel

if TYPE_CHECKING:
    from cachetalk.server.batching import StepBatcher


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass
class Step:
    """One decoded token and the text it releases (text held back while it may start a stop string)."""

    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last step


class Cancelled(Exception):
    """Decoding stopped because the client went away."""


def penalize(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """Apply OpenAI's frequency and presence penalties for the tokens generated so far."""
    if not generated or (params.frequency_penalty == 0 and params.presence_penalty == 0):
        return logits
    tokens, counts = torch.tensor(generated).unique(return_counts=True)
    logits = logits.clone()
    logits[tokens] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    # logits: [vocab]
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits.float().unsqueeze(0)  # [1, vocab]
    scores = TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs[0], 1, generator=generator))


def _split_at_stop(text: str, stops: list[str]) -> tuple[str, bool, str]:
    """Return (text safe to release, whether a stop string was hit, held-back tail)."""
    hits = [text.find(s) for s in stops if s and s in text]
    if hits:
        return text[: min(hits)], True, ""

    # Hold back the longest suffix that is a prefix of some stop string.
    held = 0
    for s in stops:
        for size in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:size]):
                held = max(held, size)
                break
    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
        held = max(held, 1)
    return text[: len(text) - held], False, text[len(text) - held:]


def decode(lm: LoadedModel, cache: DynamicCache, token_ids: list[int], params: SamplingParams,
           lock: threading.Lock | None = None, cancel: threading.Event | None = None,
           batcher: StepBatcher | None = None) -> Iterator[Step]:
    """Feed `token_ids` after `cache`, then generate up to `params.max_tokens` tokens.

    `token_ids` must not be empty: the logits of its last token give the first new token.
    The prompt runs under `lock`. Each new token then goes through `batcher`, which runs
    the steps of concurrent requests as one batch; without a batcher, each token runs
    alone under `lock`.
    """
    if not token_ids:
        raise ValueError("decode needs at least one token after the cache")
    lock = lock or threading.Lock()
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
    eos = set() if params.ignore_eos else set(lm.eos_token_ids)

    with lock:
        cache, logits = prefill(lm, token_ids, cache)

    if batcher is None:
        yield from _continue(lm, cache, logits, params, generator, eos, cancel, lock=lock)
    else:
        with batcher.member():
            yield from _continue(lm, cache, logits, params, generator, eos, cancel, batcher=batcher)


def _continue(lm: LoadedModel, cache: DynamicCache, logits: torch.Tensor, params: SamplingParams,
              generator: torch.Generator | None, eos: set[int], cancel: threading.Event | None,
              lock: threading.Lock | None = None, batcher: StepBatcher | None = None) -> Iterator[Step]:
    generated: list[int] = []
    released = 0
    for index in range(params.max_tokens):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        token = sample(penalize(logits.cpu(), params, generated), params, generator)
        if token in eos:
            text = lm.tokenizer.decode(generated, skip_special_tokens=True)
            yield Step(None, _split_at_stop(text, params.stop)[0][released:], "stop")
            return

        generated.append(token)
        text = lm.tokenizer.decode(generated, skip_special_tokens=True)
        safe, stopped, _ = _split_at_stop(text, params.stop)
        delta = safe[released:]
        released = len(safe)
        if stopped:
            yield Step(token, delta, "stop")
            return
        if index == params.max_tokens - 1:
            yield Step(token, text[len(safe) - len(delta):], "length")
            return
        yield Step(token, delta)

        if batcher is not None:
            cache, logits = batcher.step(cache, token)
        else:
            with lock:
                cache, logits = prefill(lm, [token], cache)
    yield Step(None, "", "length")  # only reached with max_tokens == 0
