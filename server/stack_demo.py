"""The demo of `cachetalk up --demo`: one question in each mode, answers and timings printed."""

from __future__ import annotations

from cachetalk.client import CachetalkError, Client
from cachetalk.client.types import ChatResponse

QUESTION = "What is the capital of France? Answer in one sentence."
STAGE_LABELS = {
    "tokenize_ms": "tokenize",
    "sharer_prefill_ms": "sharer prefill",
    "sharer_decode_ms": "sharer decode",
    "receiver_prefill_ms": "receiver prefill",
    "transfer_ms": "transfer",
    "serialization_ms": "(de)serialization",
    "bridge_ms": "bridge",
    "decode_ms": "receiver decode",
    "total_ms": "total",
}


def format_timings(reply: ChatResponse) -> str:
    timings = reply.cachetalk.timings.model_dump()
    return ", ".join(f"{label} {timings[key]:.0f}" for key, label in STAGE_LABELS.items()
                     if timings.get(key) is not None)


def run_demo(broker_url: str, receiver: str, sharer: str, max_tokens: int) -> int:
    """Ask QUESTION in c2c, t2t and solo mode; return 0 when all three requests succeeded, else 1."""
    failures = 0
    with Client(broker_url) as client:
        print(f"\nquestion: {QUESTION}\n", flush=True)
        for mode in ("c2c", "t2t", "solo"):
            sharers = [sharer] if mode != "solo" else None
            heading = f"{mode}: {receiver}" + (f" with sharer {sharer}" if sharers else " alone")
            try:
                reply = client.chat(QUESTION, model=receiver, sharers=sharers, mode=mode, max_tokens=max_tokens,
                                    temperature=0)
            except CachetalkError as exc:
                failures += 1
                print(f"{heading}\n  failed: {exc}\n", flush=True)
                continue
            bridge = reply.cachetalk.bridge
            if bridge:
                heading += f", bridge {', '.join(str(b) for b in bridge)}"
            print(f"{heading}\n  answer: {reply.text.strip()!r}\n  timings (ms): {format_timings(reply)}\n",
                  flush=True)
    return 1 if failures else 0
