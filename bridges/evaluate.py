"""Multiple-choice accuracy of receiver alone, sharer alone, C2C and the self bridge.

Each option is scored by the mean log-probability of its answer tokens ("B. text",
without the turn-end marker), conditioned on the prompt; the highest mean wins. The
mean rather than the sum keeps long options from losing by length alone. The prompt
cache is computed once per question and model and shared by all options.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from cachetalk.bridges.data import Sample
from cachetalk.bridges.store import Bridge
from cachetalk.bridges.train import Encoded, encode_sample, prefill_layers, response_log_probs
from cachetalk.server.kv import build_cache
from cachetalk.server.models import LoadedModel

logger = logging.getLogger(__name__)

CONDITIONS = ("receiver", "sharer", "c2c", "self")


def option_scores(model: LoadedModel, layers, encoded_options: list[Encoded]) -> list[float]:
    """Mean log-prob of each option's answer tokens on a shared prompt cache.

    Each option gets a fresh cache object over the same prompt tensors: a forward pass
    concatenates new positions into new tensors and leaves the prompt tensors intact.
    """
    scores = []
    for encoded in encoded_options:
        log_probs = response_log_probs(model, build_cache(layers), encoded, encoded.answer_len)
        scores.append(log_probs.mean().item())
    return scores


def encode_options(receiver: LoadedModel, sharer: LoadedModel, sample: Sample, max_prompt_tokens: int):
    return [encode_sample(receiver, sharer, sample.prompt + [{"role": "assistant", "content": option}],
                          max_prompt_tokens) for option in sample.options]


@torch.inference_mode()
def evaluate_sample(sample: Sample, receiver: LoadedModel, sharer: LoadedModel, bridge: Bridge | None,
                    self_bridge: Bridge | None, max_prompt_tokens: int) -> dict[str, bool]:
    """Return, per condition, whether the top-scored option is the right one."""
    aligned = encode_options(receiver, sharer, sample, max_prompt_tokens)
    context = aligned[0].prompt_len - 1
    results = {}

    # The three receiver conditions share one prefill of the prompt.
    receiver_layers = prefill_layers(receiver, aligned[0].receiver_ids[:context])
    results["receiver"] = option_scores(receiver, receiver_layers, aligned)

    # The sharer alone reads its own chat template: a model paired with itself needs no alignment.
    sharer_native = encode_options(sharer, sharer, sample, max_prompt_tokens)
    native_layers = prefill_layers(sharer, sharer_native[0].receiver_ids[:sharer_native[0].prompt_len - 1])
    results["sharer"] = option_scores(sharer, native_layers, sharer_native)

    if bridge is not None:
        sharer_layers = prefill_layers(sharer, aligned[0].sharer_ids[:context])
        results["c2c"] = option_scores(receiver, bridge.fuser(receiver_layers, sharer_layers), aligned)
    if self_bridge is not None:
        results["self"] = option_scores(receiver, self_bridge.fuser(receiver_layers, receiver_layers), aligned)

    return {name: max(range(len(s)), key=s.__getitem__) == sample.answer for name, s in results.items()}


def evaluate(samples: list[Sample], receiver: LoadedModel, sharer: LoadedModel, bridge: Bridge | None,
             self_bridge: Bridge | None, max_prompt_tokens: int = 384) -> dict:
    """Accuracy per task and condition, plus the chance level of each task."""
    correct: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    counts: dict[str, int] = defaultdict(int)
    chance: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    for sample in tqdm(samples, desc="eval", unit="question", dynamic_ncols=True):
        if sample.answer is None or len(sample.options) < 2:
            continue
        outcome = evaluate_sample(sample, receiver, sharer, bridge, self_bridge, max_prompt_tokens)
        counts[sample.task] += 1
        chance[sample.task] += 1 / len(sample.options)
        for name, right in outcome.items():
            correct[sample.task][name] += int(right)

    tasks = {}
    for task, count in counts.items():
        row = {name: correct[task][name] / count for name in CONDITIONS if name in correct[task]}
        tasks[task] = {"questions": count, "chance": chance[task] / count, **row}
    total = sum(counts.values())
    overall = {"questions": total, "chance": sum(chance.values()) / max(1, total)}
    for name in CONDITIONS:
        if any(name in correct[t] for t in counts):
            overall[name] = sum(correct[t][name] for t in counts) / max(1, total)
    return {"tasks": tasks, "overall": overall, "seconds": round(time.perf_counter() - started, 1)}


def format_table(results: dict) -> str:
    """Render results as a Markdown table: one row per task, accuracy in percent."""
    names = [n for n in CONDITIONS if n in results["overall"]]
    header = "| task | n | chance | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    rows = list(results["tasks"].items()) + [("**all**", results["overall"])]
    for task, row in rows:
        cells = [f"{100 * row[n]:.1f}" for n in names]
        lines.append(f"| {task} | {row['questions']} | {100 * row['chance']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
