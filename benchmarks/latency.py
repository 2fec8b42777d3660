"""Requests through the broker: every mode on the same questions, interleaved, timed by the client.

One pass serves two measurements: the end-to-end and per-stage latency of each mode,
and the accuracy of its generated answers. Each question is sent in every mode, one
request at a time, and the mode order is rotated per question so that slow drifts of
the shared machine (other processes, thermal state) spread evenly over the modes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cachetalk.benchmarks.accuracy import Question, match_option
from cachetalk.benchmarks.stats import percentile, ratio, summarize_ms
from cachetalk.client import CachetalkError, Client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModeRequest:
    """The broker request of one benchmark mode: receiver model, mode, sharers and bridge name."""

    model: str
    mode: str
    sharers: tuple[str, ...] = ()
    bridge: str | None = None


def broker_modes(receiver: str, sharer: str, bridge: str, self_bridge: str | None) -> dict[str, ModeRequest]:
    """Return the request of each mode: receiver alone, sharer alone, t2t, c2c, and the self bridge.

    Bridges are named (broker bridge names are folder names), so that the broker applies
    the same bridges the in-process scoring loads.
    """
    modes = {
        "solo": ModeRequest(receiver, "solo"),
        "sharer": ModeRequest(sharer, "solo"),
        "t2t": ModeRequest(receiver, "t2t", (sharer,)),
        "c2c": ModeRequest(receiver, "c2c", (sharer,), bridge),
    }
    if self_bridge:
        modes["self"] = ModeRequest(receiver, "c2c", (receiver,), self_bridge)
    return modes


def send(client: Client, request: ModeRequest, messages: list[dict], max_tokens: int) -> dict:
    """Send one greedy chat request; return its client-measured latency, timings and answer."""
    started = time.perf_counter()
    try:
        reply = client.chat(messages, model=request.model, sharers=list(request.sharers) or None,
                            mode=request.mode, bridge=request.bridge, max_tokens=max_tokens, temperature=0)
    except CachetalkError as exc:
        logger.error("%s request failed: %s", request.mode, exc)
        return {"error": str(exc), "ms": (time.perf_counter() - started) * 1e3}

    elapsed_ms = (time.perf_counter() - started) * 1e3
    info = reply.cachetalk
    timings = {name: value for name, value in info.timings.model_dump().items() if value is not None} if info else {}
    return {
        "ms": elapsed_ms,
        "text": reply.text,
        "timings": timings,
        "bridge": info.bridge if info else None,
        "notes": [note.text for note in info.notes] if info and info.notes else None,
        "prompt_tokens": reply.usage.prompt_tokens if reply.usage else None,
        "completion_tokens": reply.usage.completion_tokens if reply.usage else None,
    }


def warm_up(client: Client, modes: dict[str, ModeRequest], question: Question) -> None:
    """Send one untimed request per mode, so that first-call costs (allocation, lazy setup) stay out of the numbers."""
    for name, request in modes.items():
        record = send(client, request, question.messages, max_tokens=2)
        if "error" in record:
            raise RuntimeError(f"warm-up request in mode {name} failed: {record['error']}")
        logger.info("warm-up %s: %.0f ms", name, record["ms"])


def run_broker_pass(client: Client, questions: list[Question], modes: dict[str, ModeRequest],
                    max_tokens: int) -> list[dict]:
    """Ask every question in every mode, rotating the mode order; return one record per request."""
    names = list(modes)
    warm_up(client, modes, questions[0])
    records = []
    for number, question in enumerate(questions):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            record = send(client, modes[name], question.messages, max_tokens)
            chosen = None if "error" in record else match_option(record["text"], question.sample.options)
            record.update({"mode": name, "question": number, "task": question.task, "chosen": chosen,
                           "right": chosen is not None and chosen == question.sample.answer})
            records.append(record)
        latest = records[-len(names):]
        logger.info("broker pass %d/%d (%s): %s", number + 1, len(questions), question.task,
                    ", ".join(f"{r['mode']} {r['ms']:.0f} ms" for r in latest))
    return records


def summarize_latency(records: list[dict]) -> dict:
    """Per mode: end-to-end and per-stage summaries of successful requests, plus the two headline ratios."""
    latency: dict = {}
    for name in dict.fromkeys(r["mode"] for r in records):
        done = [r for r in records if r["mode"] == name and "error" not in r]
        if not done:
            continue
        entry = summarize_ms([r["ms"] for r in done])
        stages = {}
        for stage in dict.fromkeys(s for r in done for s in r["timings"]):
            values = [r["timings"][stage] for r in done if stage in r["timings"]]
            stages[stage] = summarize_ms(values)
        entry["stages"] = stages
        entry["errors"] = sum(1 for r in records if r["mode"] == name and "error" in r)
        latency[name] = entry

    for required in ("solo", "t2t", "c2c"):
        if required not in latency:
            failed = next(r["error"] for r in records if r["mode"] == required)
            raise RuntimeError(f"every {required} request failed; first error: {failed}")
    latency["ratio_t2t_over_c2c"] = ratio(latency["t2t"]["median_ms"], latency["c2c"]["median_ms"])
    latency["ratio_c2c_over_solo"] = ratio(latency["c2c"]["median_ms"], latency["solo"]["median_ms"])
    return latency


def share_of_c2c(records: list[dict]) -> tuple[float, dict]:
    """Return the median share of c2c time spent on serialization and transfer, and its parts in ms.

    The share is taken per request from the broker's timings, then the median over requests.
    """
    done = [r for r in records if r["mode"] == "c2c" and "error" not in r]
    shares, moved = [], []
    for record in done:
        timings = record["timings"]
        spent = timings.get("serialization_ms", 0.0) + timings.get("transfer_ms", 0.0)
        moved.append(spent)
        shares.append(spent / timings["total_ms"])
    detail = {
        "serialization_ms": percentile([r["timings"].get("serialization_ms", 0.0) for r in done], 50),
        "transfer_ms": percentile([r["timings"].get("transfer_ms", 0.0) for r in done], 50),
        "serialization_and_transfer_ms": percentile(moved, 50),
        "total_ms": percentile([r["timings"]["total_ms"] for r in done], 50),
        "prompt_tokens": percentile([r["prompt_tokens"] or 0 for r in done], 50),
        "requests": len(done),
    }
    return percentile(shares, 50), detail
