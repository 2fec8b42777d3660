"""Render a benchmark result (the dict saved as results.json) as RESULTS.md."""

from __future__ import annotations

from pathlib import Path

MODE_LABELS = {
    "solo": "receiver alone (solo)",
    "sharer": "sharer alone",
    "t2t": "text to text (t2t)",
    "c2c": "cache to cache (c2c)",
    "self": "self bridge (receiver to receiver)",
}


def percent_with_interval(summary: dict | None) -> str:
    if not summary or "accuracy" not in summary:
        return "n/a"
    return (f"{100 * summary['accuracy']:.1f} "
            f"({100 * summary['ci_low']:.1f}-{100 * summary['ci_high']:.1f})")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def render_meta(results: dict) -> list[str]:
    meta = results["meta"]
    machine = meta["machine"]
    load = meta["load_average"]
    quick = " (quick mode: a few questions, small caches; the numbers are rough)" if meta.get("quick") else ""
    return [
        "# cachetalk benchmark results",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- Run: {meta['started']}, {meta['duration_s'] / 60:.1f} minutes{quick}.",
        f"- Machine: {machine['cpu_count']} CPU cores ({machine['platform']}), Python {machine['python']}, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), transformers {machine['transformers']}, "
        f"{'GPU ' + machine['gpu'] if machine.get('gpu') else 'no GPU'}.",
        "- Load average (1, 5, 15 minutes): " + ", ".join(f"{v:.1f}" for v in load["start"]) + " at the start, "
        + ", ".join(f"{v:.1f}" for v in load["end"]) + f" at the end. Above {machine['cpu_count']}, other "
        "processes competed for the CPU and the timings are inflated.",
        f"- Models: receiver {meta['receiver']}, sharer {meta['sharer']}; bridge {meta['bridge']}, "
        f"self bridge {meta['self_bridge']}; t2t notes of at most {meta['t2t_max_tokens']} tokens.",
        f"- Stack: {meta['stack']}"
        + (f", torch threads per agent: {meta['agent_threads']}" if meta.get("agent_threads") else "")
        + (f", decode batch of at most {meta['agent_max_batch']}" if meta.get("agent_max_batch") else "")
        + ". Every request and t2t note is in `answers.jsonl`.",
    ]


def render_targets(results: dict) -> list[str]:
    rows = []
    for target in results.get("targets", []):
        measured = "n/a" if target["value"] is None else f"{target['value']:.3g}"
        met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
        rows.append([target["name"], measured, target["goal"], met])
    lines = ["", "## Targets", ""] + table(["target", "measured", "goal", "met"], rows)
    notes = [t for t in results.get("targets", []) if t.get("note")]
    if notes:
        lines += ["", "What limits each target that was missed, from the measurements of this run:", ""]
        lines += [f"- **{t['name']}**: {t['note']}" for t in notes]
    return lines


def render_accuracy(results: dict) -> list[str]:
    accuracy = results.get("accuracy") or {}
    if not accuracy:
        return []
    setup = results["meta"].get("accuracy", {})
    lines = [
        "", "## Accuracy", "",
        "Multiple-choice accuracy in percent with the Wilson 95% interval in brackets. "
        "*Log-likelihood*: the option with the highest mean log-probability under each mode's "
        "prompt cache, computed in process with the bridges' evaluation code. *Generated*: the "
        f"greedy answer ({setup.get('answer_max_tokens', '?')} tokens at most) through the broker, "
        "matched to an option by its letter or its text. Held-out examples: the test split of "
        "the bridges' training tasks; held-out tasks: every example of tasks the bridges never saw. "
        f"At most {setup.get('per_task', '?')} questions per task.",
        "",
    ]
    rows = []
    for mode, entry in accuracy.items():
        splits = entry.get("splits", {})
        rows.append([MODE_LABELS.get(mode, mode), percent_with_interval(entry),
                     percent_with_interval(splits.get("heldout_examples")),
                     percent_with_interval(splits.get("heldout_tasks")),
                     percent_with_interval(entry.get("generated")),
                     entry.get("n") or entry.get("generated", {}).get("n", 0)])
    lines += table(["mode", "log-likelihood", "held-out examples", "held-out tasks", "generated", "questions"],
                   rows)

    modes = list(accuracy)
    questions = setup.get("tasks", {})
    for measure, title in (("loglik", "log-likelihood"), ("generated", "generated answer")):
        rows = []
        for task, info in questions.items():
            cells = []
            for mode in modes:
                entry = accuracy[mode] if measure == "loglik" else accuracy[mode].get("generated") or {}
                cells.append(percent_with_interval(entry.get("tasks", {}).get(task)))
            rows.append([task, info["split"], info["n"], f"{100 * info['chance']:.1f}"] + cells)
        lines += ["", f"Per task, {title}:", ""]
        lines += table(["task", "split", "n", "chance"] + modes, rows)
    return lines


def render_comparisons(results: dict) -> list[str]:
    comparisons = results.get("comparisons") or {}
    if not comparisons:
        return []
    lines = ["", "c2c against each mode on the same questions: questions c2c got right and the other wrong "
             "(wins), the reverse (losses), and the two-sided exact McNemar p-value of the difference.", ""]
    rows = []
    for name, measures in comparisons.items():
        for measure, entry in measures.items():
            rows.append([name.replace("_vs_", " vs "), measure, entry["wins"], entry["losses"], entry["ties"],
                         f"{entry['p_value']:.3f}"])
    return lines + table(["comparison", "measure", "wins", "losses", "ties", "p-value"], rows)


def render_latency(results: dict) -> list[str]:
    latency = results.get("latency") or {}
    modes = [mode for mode, entry in latency.items() if isinstance(entry, dict) and "median_ms" in entry]
    if not modes:
        return []
    # Stages in the order the broker reports them, which is the order they run in.
    stages = list(dict.fromkeys(stage for mode in modes for stage in latency[mode].get("stages", {})))
    lines = [
        "", "## Latency", "",
        "The same questions in every mode through the broker, one request at a time, the mode "
        "order rotated per question. End to end is measured by the client; stages come from the "
        f"broker's `cachetalk.timings` (medians, ms). t2t/c2c = {latency['ratio_t2t_over_c2c']:.2f}x, "
        f"c2c/solo = {latency['ratio_c2c_over_solo']:.2f}x (ratios of median end-to-end latency).",
        "",
    ]
    rows = []
    for mode in modes:
        entry = latency[mode]
        cells = [f"{entry['stages'][s]['median_ms']:.0f}" if s in entry.get("stages", {}) else "" for s in stages]
        rows.append([mode, entry["n"], f"{entry['median_ms']:.0f}", f"{entry['p90_ms']:.0f}"] + cells)
    lines += table(["mode", "requests", "median ms", "p90 ms"] + [s.removesuffix("_ms") for s in stages], rows)
    return lines


def render_wire(results: dict) -> list[str]:
    wire = results.get("wire") or {}
    if not wire:
        return []
    lines = [
        "", "## KV wire format", "",
        "`client/wire.py` encode plus decode of random caches of each model's shape (float32), "
        "against one `np.copyto` of the same bytes into a buffer that was written before. "
        f"Median of {wire['repeats']} runs per point.",
        "",
    ]
    rows = [[p["model"], p["tokens"], f"{p['bytes'] / 1e6:.1f}", f"{p['encode_ms']:.1f}", f"{p['decode_ms']:.1f}",
             f"{p['memcpy_ms']:.1f}", f"{p['encode_decode_gb_per_s']:.2f}", f"{p['memcpy_gb_per_s']:.2f}",
             f"{p['ratio_to_memcpy']:.3f}"] for p in wire["points"]]
    lines += table(["model", "tokens", "MB", "encode ms", "decode ms", "memcpy ms", "GB/s", "memcpy GB/s",
                    "share of memcpy"], rows)

    profile = wire.get("profile_at_largest", {})
    if profile:
        steps = list(next(iter(profile.values())))
        lines += ["", "Where encode and decode spend their time at the largest size (ms):", ""]
        lines += table(["model"] + [s.removesuffix("_ms") for s in steps],
                       [[model] + [f"{times[s]:.1f}" for s in steps] for model, times in profile.items()])
    share = wire.get("share_of_c2c_detail")
    if share:
        lines += ["", f"In c2c requests through the broker, serialization and transfer take "
                  f"{100 * wire['share_of_c2c']:.1f}% of the median end-to-end time "
                  f"({share['serialization_and_transfer_ms']:.0f} of {share['total_ms']:.0f} ms, "
                  f"prompts of {share['prompt_tokens']:.0f} tokens at the median)."]
    return lines


def render_concurrency(results: dict) -> list[str]:
    concurrency = results.get("concurrency") or {}
    levels = sorted(int(level) for level, entry in concurrency.items() if isinstance(entry, dict))
    if not levels:
        return []
    lines = ["", "## Concurrency", "",
             "c2c requests through the broker from an httpx AsyncClient, a fixed number per level.", ""]
    rows = []
    for level in levels:
        entry = concurrency[str(level)]
        rows.append([level, entry["requests"], entry["errors"], f"{entry['requests_per_s']:.3f}",
                     f"{entry['median_ms']:.0f}", f"{entry['p90_ms']:.0f}"])
    lines += table(["concurrent", "requests", "errors", "requests/s", "median ms", "p90 ms"], rows)
    return lines


def render_plots(plots: list[Path]) -> list[str]:
    if not plots:
        return []
    lines = ["", "## Plots", ""]
    lines += [f"![{path.stem}]({path.name})" for path in plots]
    return lines


def render_markdown(results: dict, plots: list[Path]) -> str:
    """Return RESULTS.md: the run's setup, targets, then one section per measurement, then plots."""
    lines = render_meta(results)
    for render in (render_targets, render_accuracy, render_comparisons, render_latency, render_wire,
                   render_concurrency):
        lines += render(results)
    lines += render_plots(plots)
    return "\n".join(lines) + "\n"
