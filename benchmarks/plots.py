"""PNG plots of a benchmark result (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

logger = logging.getLogger(__name__)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_accuracy(accuracy: dict, path: Path) -> Path:
    """Bar chart of overall accuracy per mode and measure, with Wilson 95% intervals as error bars.

    `accuracy[mode]` is the option log-likelihood summary and `accuracy[mode]["generated"]`
    the summary of generated answers, when measured.
    """
    modes = list(accuracy)
    measures = {
        "option log-likelihood": lambda mode: accuracy[mode] if "accuracy" in accuracy[mode] else None,
        "generated answer (through the broker)": lambda mode: accuracy[mode].get("generated"),
    }
    figure, axes = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(measures)
    for offset, (label, summary_of) in enumerate(measures.items()):
        xs, heights, below, above = [], [], [], []
        for index, mode in enumerate(modes):
            summary = summary_of(mode)
            if not summary:
                continue
            xs.append(index + (offset - (len(measures) - 1) / 2) * width)
            heights.append(summary["accuracy"])
            below.append(summary["accuracy"] - summary["ci_low"])
            above.append(summary["ci_high"] - summary["accuracy"])
        if xs:
            axes.bar(xs, heights, width, yerr=[below, above], capsize=4, label=label)

    axes.set_xticks(range(len(modes)), modes)
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1)
    axes.set_title("Multiple-choice accuracy (95% Wilson intervals)")
    axes.legend()
    return _save(figure, path)


def plot_latency(latency: dict, path: Path) -> Path:
    """Stacked bars of the median time per stage for each mode, next to the median end-to-end latency."""
    modes = [mode for mode, entry in latency.items() if isinstance(entry, dict) and "median_ms" in entry]
    stages = list(dict.fromkeys(stage for mode in modes for stage in latency[mode].get("stages", {})
                                if stage != "total_ms"))
    figure, axes = plt.subplots(figsize=(8, 4.5))
    bottoms = [0.0] * len(modes)
    for stage in stages:
        heights = [latency[mode].get("stages", {}).get(stage, {}).get("median_ms", 0.0) for mode in modes]
        axes.bar(range(len(modes)), heights, 0.5, bottom=bottoms, label=stage.removesuffix("_ms"))
        bottoms = [b + h for b, h in zip(bottoms, heights)]

    end_to_end = [latency[mode]["median_ms"] for mode in modes]
    axes.scatter(range(len(modes)), end_to_end, color="black", marker="_", s=900, zorder=3,
                 label="end to end (client)")
    axes.set_xticks(range(len(modes)), modes)
    axes.set_ylabel("median latency (ms)")
    # c2c prefills the sharer and the receiver at the same time, so its stacked stages can
    # add up to more than the end-to-end time.
    axes.set_title("Latency per stage (medians; concurrent stages overlap)")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_wire(wire: dict, path: Path) -> Path:
    """Throughput of encode plus decode against a plain memory copy, per model and cache size."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    models = sorted({point["model"] for point in wire["points"]})
    for model in models:
        points = [p for p in wire["points"] if p["model"] == model]
        tokens = [p["tokens"] for p in points]
        line, = axes.plot(tokens, [p["encode_decode_gb_per_s"] for p in points], marker="o",
                          label=f"{model} encode + decode")
        axes.plot(tokens, [p["memcpy_gb_per_s"] for p in points], linestyle="--", color=line.get_color(),
                  label=f"{model} memcpy")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("cache length (tokens)")
    axes.set_ylabel("GB/s")
    axes.set_title("KV wire format throughput")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_concurrency(concurrency: dict, path: Path) -> Path:
    """Requests per second and median latency against the number of concurrent c2c requests."""
    levels = sorted(int(level) for level, entry in concurrency.items() if isinstance(entry, dict))
    figure, left = plt.subplots(figsize=(8, 4.5))
    left.plot(levels, [concurrency[str(n)]["requests_per_s"] for n in levels], marker="o", color="tab:blue")
    left.set_xlabel("concurrent requests")
    left.set_ylabel("requests/s", color="tab:blue")
    left.set_xscale("log", base=2)
    right = left.twinx()
    right.plot(levels, [concurrency[str(n)]["median_ms"] for n in levels], marker="s", color="tab:red")
    right.set_ylabel("median latency (ms)", color="tab:red")
    left.set_title("c2c throughput under concurrency")
    return _save(figure, path)


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """Write one PNG per measured section; return the paths written."""
    makers = {
        "accuracy": (plot_accuracy, "accuracy.png"),
        "latency": (plot_latency, "latency.png"),
        "wire": (plot_wire, "wire.png"),
        "concurrency": (plot_concurrency, "concurrency.png"),
    }
    written = []
    for section, (make, filename) in makers.items():
        if results.get(section):
            written.append(make(results[section], out_dir / filename))
    logger.info("wrote %d plots to %s", len(written), out_dir)
    return written
