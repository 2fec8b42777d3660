"""The speed targets of cachetalk, checked against a benchmark result, with what limits each missed one.

The notes are built from the measurements of the same run (stage medians, the wire
profile, request rates), so they show where the time went and never guess.
"""

from __future__ import annotations

TARGETS = (
    # name, goal text, lower is better, threshold
    ("t2t / c2c median latency", ">= 4x", False, 4.0),
    ("c2c / solo median latency", "<= 1.25x", True, 1.25),
    ("wire encode + decode, share of memcpy speed", ">= 0.5", False, 0.5),
    ("serialization + transfer, share of c2c time", "<= 10%", True, 0.10),
    ("throughput at highest concurrency / at 1", ">= 2x", False, 2.0),
)


def _stage_medians(entry: dict) -> dict[str, float]:
    return {name.removesuffix("_ms"): summary["median_ms"] for name, summary in entry.get("stages", {}).items()
            if name != "total_ms"}


def _stages_text(entry: dict) -> str:
    medians = _stage_medians(entry)
    return ", ".join(f"{name} {ms:.0f}" for name, ms in sorted(medians.items(), key=lambda item: -item[1]))


def note_t2t_over_c2c(results: dict) -> str:
    latency = results["latency"]
    t2t, c2c = latency["t2t"], latency["c2c"]
    sharer_decode = _stage_medians(t2t).get("sharer_decode", 0.0)
    return (f"t2t takes {t2t['median_ms']:.0f} ms at the median (stages in ms: {_stages_text(t2t)}); c2c takes "
            f"{c2c['median_ms']:.0f} ms ({_stages_text(c2c)}). What t2t adds is mostly the sharer writing its "
            f"note ({sharer_decode:.0f} ms of decoding, at most {results['meta']['t2t_max_tokens']} tokens), "
            "so the ratio grows with the note's length and shrinks when the sharer stops early.")


def note_c2c_over_solo(results: dict) -> str:
    latency = results["latency"]
    solo, c2c = latency["solo"], latency["c2c"]
    stages = _stage_medians(c2c)
    sharer, receiver = stages.get("sharer_prefill", 0.0), stages.get("receiver_prefill", 0.0)
    slower = "sharer" if sharer > receiver else "receiver"
    extra = ", ".join(f"{name} {stages[name]:.0f} ms" for name in ("tokenize", "transfer", "serialization", "bridge")
                      if name in stages)
    return (f"solo takes {solo['median_ms']:.0f} ms ({_stages_text(solo)}); c2c takes {c2c['median_ms']:.0f} ms "
            f"({_stages_text(c2c)}). The two prefills run at the same time, so the slower one, the {slower} "
            f"({max(sharer, receiver):.0f} ms against {min(sharer, receiver):.0f} ms), sets the pace, and c2c "
            f"adds {extra} on top (medians).")


def note_wire(results: dict) -> str:
    wire = results["wire"]
    largest = max(point["tokens"] for point in wire["points"])
    parts = []
    for model, steps in wire.get("profile_at_largest", {}).items():
        parts.append(
            f"{model}: encode {steps['encode_ms']:.0f} ms, decode {steps['decode_ms']:.1f} ms; one memcpy into a "
            f"reused buffer {steps['reference_memcpy_ms']:.0f} ms, one copy into new numpy memory "
            f"{steps['reference_copy_to_new_memory_ms']:.0f} ms, one join into a new bytes object "
            f"{steps['reference_join_to_new_bytes_ms']:.0f} ms")
    return (f"encode copies the tensors once, into a newly allocated bytes message, and decode reads the body in "
            f"place. At {largest} tokens: " + "; ".join(parts)
            + ". Encode costs about one copy into new memory, which pays a page fault on the first touch of each "
            "page; the memcpy reference writes into a buffer that is already mapped. Reaching 0.5 at large caches "
            "would need encoding into a reused, preallocated buffer.")


def note_share(results: dict) -> str:
    detail = results["wire"]["share_of_c2c_detail"]
    return (f"median serialization {detail['serialization_ms']:.0f} ms (broker decode and encode of the caches "
            f"plus the receiver's import) and transfer {detail['transfer_ms']:.0f} ms (HTTP time outside the "
            f"agents' compute, including their cache packing) of {detail['total_ms']:.0f} ms, "
            f"for prompts of {detail['prompt_tokens']:.0f} tokens.")


def note_concurrency(results: dict) -> str:
    concurrency = results["concurrency"]
    levels = sorted(int(level) for level, entry in concurrency.items() if isinstance(entry, dict))
    rates = ", ".join(f"{level}: {concurrency[str(level)]['requests_per_s']:.3f}/s" for level in levels)
    cores = results["meta"]["machine"]["cpu_count"]
    max_batch = results["meta"].get("agent_max_batch")
    batching = (f"Agents batch the decode steps of concurrent requests (up to {max_batch} per step), but run one "
                "prompt at a time" if max_batch and max_batch > 1 else "Agents ran without decode batching, one "
                "forward pass at a time")
    stages = ((results.get("latency") or {}).get("c2c") or {}).get("stages") or {}
    if {"sharer_prefill_ms", "receiver_prefill_ms", "decode_ms"} <= stages.keys():
        costs = (f": one c2c request costs a sharer prompt pass of {stages['sharer_prefill_ms']['median_ms']:.0f} ms "
                 f"and a receiver prompt pass of {stages['receiver_prefill_ms']['median_ms']:.0f} ms against "
                 f"{stages['decode_ms']['median_ms']:.0f} ms of decoding (medians, one request at a time)")
    else:
        costs = ""
    return (f"requests/s by concurrency: {rates}. {batching}{costs}. Prompt passes are compute-bound and both "
            f"agents, the broker and the client share {cores} CPU cores, so more requests in flight queue for "
            "the same cores.")


def measured_values(results: dict) -> list[float | None]:
    latency = results.get("latency") or {}
    wire = results.get("wire") or {}
    concurrency = results.get("concurrency") or {}
    return [
        latency.get("ratio_t2t_over_c2c"),
        latency.get("ratio_c2c_over_solo"),
        wire.get("ratio_to_memcpy"),
        wire.get("share_of_c2c"),
        concurrency.get("speedup_highest_over_lowest"),
    ]


def check_targets(results: dict) -> list[dict]:
    """Return, per target, the measured value, whether it was met and, when missed, what limits it."""
    notes = (note_t2t_over_c2c, note_c2c_over_solo, note_wire, note_share, note_concurrency)
    checked = []
    for (name, goal, lower_is_better, threshold), value, note in zip(TARGETS, measured_values(results), notes):
        if value is None:
            met = None
        elif lower_is_better:
            met = value <= threshold
        else:
            met = value >= threshold
        entry = {"name": name, "goal": goal, "threshold": threshold, "value": value, "met": met}
        if met is False:
            entry["note"] = note(results)
        checked.append(entry)

    concurrency = results.get("concurrency") or {}
    levels = sorted(int(level) for level, entry in concurrency.items() if isinstance(entry, dict))
    if levels and levels[-1] != 16:
        checked[-1]["name"] = f"throughput at {levels[-1]} / at {levels[0]} concurrent (the target is for 16)"
    return checked

