"""`cachetalk bench`: accuracy, latency, wire throughput and concurrency of c2c against t2t and solo.

One command measures whether cache exchange is both faster than text exchange and at
least as accurate, and writes `results.json`, `RESULTS.md` and PNG plots into `--out`.

Order of work: the requests through the broker (latency, generated answers, the
sharers' t2t notes, concurrency) run while the stack is up; the stack then stops, so
that the in-process log-likelihood scoring and the wire benchmark do not compete with
idle agents for memory.

Example:
    cachetalk bench --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from cachetalk.benchmarks import accuracy as acc
from cachetalk.benchmarks.concurrency import run_concurrency
from cachetalk.benchmarks.latency import broker_modes, run_broker_pass, share_of_c2c, summarize_latency
from cachetalk.benchmarks.plots import write_plots
from cachetalk.benchmarks.report import render_markdown
from cachetalk.benchmarks.stack import (DEFAULT_BRIDGE, DEFAULT_SELF_BRIDGE, Bridges, bench_stack,
                                         check_broker_bridges, load_bridges)
from cachetalk.benchmarks.stats import paired_comparison
from cachetalk.benchmarks.targets import check_targets
from cachetalk.benchmarks.wire import ModelShape, run_wire_benchmark
from cachetalk.bridges.data import DataUnavailableError
from cachetalk.client import Client
from cachetalk.server.models import load_model
from cachetalk.server.runtime import DEFAULT_MAX_BATCH

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a small run of a few minutes: 2 questions from each of 2 tasks, t2t notes of 32 "
                             "tokens, caches up to 1,024 tokens, concurrency 1 and 4")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json, RESULTS.md "
                        "and the plots (default ./bench-out)")

    parser.add_argument("--broker-url", help="use this running broker instead of starting the default stack")
    parser.add_argument("--bridge", type=Path, help="bridge folder, sharer -> receiver (default: the shipped "
                        f"{DEFAULT_BRIDGE})")
    parser.add_argument("--self-bridge", type=Path, help="self bridge folder, receiver -> receiver (default: the "
                        f"shipped {DEFAULT_SELF_BRIDGE}); the broker must have loaded the same bridges")

    parser.add_argument("--per-task", type=int, help="questions per task at most (default 10; 2 with --quick)")
    parser.add_argument("--tasks", help="comma-separated BIG-bench tasks the bridges were trained on; their test "
                        "split is scored (default: the 14 training tasks; none: no such tasks)")
    parser.add_argument("--heldout-tasks", help="comma-separated tasks the bridges never saw; all their examples are "
                        "scored (default: 6 BIG-bench tasks); gpqa names GPQA Diamond, which needs no BIG-bench")
    parser.add_argument("--answer-max-tokens", type=int, default=24,
                        help="token limit of generated answers through the broker (default 24)")
    parser.add_argument("--t2t-max-tokens", type=int,
                        help="token limit of the sharer's t2t note; must equal the broker's t2t_max_tokens "
                             "(default 256; 32 with --quick)")
    parser.add_argument("--max-prompt-tokens", type=int, default=384,
                        help="prompt limit of log-likelihood scoring, as in `cachetalk bridge eval` (default 384)")

    parser.add_argument("--wire-max-tokens", type=int, help="largest cache of the wire benchmark (default 8192; "
                        "1024 with --quick)")
    parser.add_argument("--wire-repeats", type=int, help="timed runs per wire point (default 5; 3 with --quick)")

    parser.add_argument("--concurrency", help="comma-separated concurrency levels (default 1,4,16; 1,4 with --quick)")
    parser.add_argument("--requests-per-level", type=int,
                        help="c2c requests per concurrency level (default: twice the level, at least 8; "
                             "with --quick, the level, at least 2)")
    parser.add_argument("--agent-threads", type=int,
                        help="torch threads per agent of the started stack (default: that of `cachetalk up`)")

    parser.add_argument("--max-batch", type=int,
                        help="most decode steps an agent of the started stack batches (default: the agent's, 16; "
                             "1 turns batching off, for comparison)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: accuracy, latency, wire, "
                        "concurrency (latency also gives the generated-answer accuracy)")


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick."""
    quick = args.quick
    args.per_task = args.per_task or (2 if quick else 10)
    args.t2t_max_tokens = args.t2t_max_tokens or (32 if quick else 256)
    args.wire_max_tokens = args.wire_max_tokens or (1024 if quick else 8192)
    args.wire_repeats = args.wire_repeats or (3 if quick else 5)
    args.levels = [int(v) for v in (args.concurrency or ("1,4" if quick else "1,4,16")).split(",")]
    if args.requests_per_level:
        args.requests = {level: args.requests_per_level for level in args.levels}
    elif quick:
        args.requests = {level: max(2, level) for level in args.levels}
    else:
        args.requests = {level: max(8, 2 * level) for level in args.levels}
    if args.tasks == "none":
        args.training_tasks = ()
    elif args.tasks:
        args.training_tasks = tuple(filter(None, args.tasks.split(",")))
    else:
        args.training_tasks = acc.QUICK_TRAINING_TASKS if quick else acc.TRAINING_TASKS
    if args.heldout_tasks:
        args.heldout = tuple(filter(None, args.heldout_tasks.split(",")))
    else:
        args.heldout = acc.QUICK_HELDOUT_TASKS if quick else acc.HELDOUT_TASKS
    args.skipped = set(filter(None, args.skip.split(",")))
    if unknown := args.skipped - {"accuracy", "latency", "wire", "concurrency"}:
        raise SystemExit(f"unknown section(s) in --skip: {sorted(unknown)}; expected accuracy, latency, wire, "
                         "concurrency")
    return args


def machine_info() -> dict:
    import torch
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_count": cores,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def through_broker(args, base_url: str, questions, bridges: Bridges, results: dict) -> dict:
    """Run everything that needs the stack; return the model shapes, per-request records and t2t notes."""
    state: dict = {"records": [], "notes": None}
    modes = broker_modes(bridges.receiver, bridges.sharer, bridges.folder.name,
                         bridges.self_folder.name if bridges.self_folder else None)
    with Client(base_url, timeout=1800) as client:
        check_broker_bridges(client, bridges)
        agents = {agent.name: agent for agent in client.agents()}
        state["shapes"] = [ModelShape.from_model_entry(agents[name].model) for name in (bridges.receiver,
                                                                                        bridges.sharer)]
        if "latency" not in args.skipped:
            state["records"] = run_broker_pass(client, questions, modes, args.answer_max_tokens)
            results["latency"] = summarize_latency(state["records"])
        if "accuracy" not in args.skipped:
            state["notes"] = notes_from_records(state["records"], len(questions))
            if state["notes"] is None:
                state["notes"] = acc.fetch_sharer_notes(agents[bridges.sharer].url, bridges.sharer, questions,
                                                        args.t2t_max_tokens)

    if "concurrency" not in args.skipped:
        results["concurrency"] = run_concurrency(base_url, modes["c2c"], [q.messages for q in questions],
                                                 args.levels, args.requests, args.answer_max_tokens)
    return state


def notes_from_records(records: list[dict], count: int) -> list[str] | None:
    """The sharer's t2t note per question, as the broker returned it in the latency pass; None if any is missing."""
    notes = {r["question"]: r["notes"][0] for r in records if r["mode"] == "t2t" and r.get("notes")}
    if len(notes) != count:
        return None
    return [notes[number] for number in range(count)]


def generated_outcomes(records: list[dict]) -> dict[str, list[dict]]:
    """Per mode, the broker records in question order."""
    by_mode: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["question"]):
        by_mode.setdefault(record["mode"], []).append(record)
    return by_mode


def generated_accuracy(questions, by_mode: dict[str, list[dict]]) -> dict[str, dict]:
    summaries = {}
    for mode, records in by_mode.items():
        summary = acc.summarize_outcomes(questions, [r["right"] for r in records])
        summary["unmatched"] = sum(1 for r in records if r.get("chosen") is None)
        summary["errors"] = sum(1 for r in records if "error" in r)
        summaries[mode] = summary
    return summaries


def in_process_outcomes(args, questions, bridges: Bridges, notes: list[str] | None) -> dict[str, list[bool]]:
    receiver = load_model(bridges.receiver)
    sharer = load_model(bridges.sharer)
    bridges.bridge.check(sharer.fingerprint, receiver.fingerprint)
    if bridges.self_bridge is not None:
        bridges.self_bridge.check(receiver.fingerprint, receiver.fingerprint)
    return acc.loglik_outcomes(questions, receiver, sharer, bridges.bridge, bridges.self_bridge, notes,
                               args.max_prompt_tokens, args.t2t_max_tokens)


def compare_with_c2c(loglik: dict[str, list[bool]], generated: dict[str, list[bool]]) -> dict[str, dict]:
    """Compare c2c with solo, t2t, self and the sharer on the same questions, per measure."""
    comparisons: dict[str, dict] = {}
    for other in ("solo", "t2t", "self", "sharer"):
        for measure, outcomes in (("loglik", loglik), ("generated", generated)):
            if "c2c" in outcomes and other in outcomes:
                comparisons.setdefault(f"c2c_vs_{other}", {})[measure] = paired_comparison(outcomes["c2c"],
                                                                                           outcomes[other])
    return comparisons


def assemble_accuracy(loglik: dict[str, dict], generated: dict[str, dict]) -> dict[str, dict]:
    """Merge the two measures: `accuracy[mode]` is the log-likelihood summary, `["generated"]` the other."""
    merged = {}
    for mode in ("solo", "sharer", "t2t", "c2c", "self"):
        if mode in loglik:
            merged[mode] = dict(loglik[mode])
        if mode in generated:
            merged.setdefault(mode, {})["generated"] = generated[mode]
    return merged


def local_shapes(bridges: Bridges) -> list[ModelShape]:
    return [ModelShape.from_loaded(load_model(name)) for name in (bridges.receiver, bridges.sharer)]


def run_meta(args, bridges: Bridges, questions, stack: str, started: float, load_at_start: tuple) -> dict:
    return {
        "command": "cachetalk " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_s": time.time() - started,
        "quick": args.quick,
        "machine": machine_info(),
        # 1, 5 and 15 minute load averages: above the core count, other processes competed for the CPU.
        "load_average": {"start": list(load_at_start), "end": list(os.getloadavg())},
        "receiver": bridges.receiver,
        "sharer": bridges.sharer,
        "bridge": bridges.folder.name,
        "self_bridge": bridges.self_folder.name if bridges.self_folder else None,
        "stack": stack,
        "t2t_max_tokens": args.t2t_max_tokens,
        "agent_threads": args.agent_threads if not args.broker_url else None,
        "agent_max_batch": (args.max_batch or DEFAULT_MAX_BATCH) if not args.broker_url else None,
        "accuracy": {
            "per_task": args.per_task,
            "answer_max_tokens": args.answer_max_tokens,
            "max_prompt_tokens": args.max_prompt_tokens,
            "training_tasks": list(args.training_tasks),
            "heldout_tasks": list(args.heldout),
            "tasks": acc.describe_questions(questions),
        },
        "concurrency_requests": {str(level): count for level, count in args.requests.items()},
    }


def write_records(out: Path, questions, state: dict) -> None:
    """Write every broker request (answer text, timings) and every t2t note to answers.jsonl, for auditing."""
    with (out / "answers.jsonl").open("w") as file:
        for record in state["records"]:
            file.write(json.dumps(record) + "\n")
        for number, note in enumerate(state["notes"] or []):
            file.write(json.dumps({"mode": "t2t_note", "question": number, "task": questions[number].task,
                                   "text": note}) + "\n")


def check_finite(value, path: str = "results") -> None:
    """Raise ValueError at the first number in the result that is NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_finite(item, f"{path}[{index}]")


def write_outputs(out: Path, results: dict) -> None:
    check_finite(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = write_plots(results, out)
    (out / "RESULTS.md").write_text(render_markdown(results, plots))
    logger.info("wrote %s, %s and %d plots", out / "results.json", out / "RESULTS.md", len(plots))


def run(args: argparse.Namespace) -> int:
    args = resolve_settings(args)
    started = time.time()
    load_at_start = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    bridges = load_bridges(args)
    acc.check_heldout_tasks(bridges.bridge.card, args.heldout)
    try:
        questions = acc.load_questions(args.training_tasks, args.heldout, args.per_task)
    except DataUnavailableError as exc:
        logger.error("%s", exc)
        return 1
    if not questions:
        logger.error("no multiple-choice questions in tasks %s", args.training_tasks + args.heldout)
        return 1

    results: dict = {}
    state: dict = {"records": [], "notes": None, "shapes": []}
    if not {"latency", "accuracy", "concurrency"} <= args.skipped:
        if args.broker_url:
            stack = f"the running broker at {args.broker_url}"
            state = through_broker(args, args.broker_url, questions, bridges, results)
        else:
            stack = "two agents and a broker started by the bench"
            with bench_stack(args, bridges) as url:
                state = through_broker(args, url, questions, bridges, results)
    else:
        stack = "not used"
    write_records(args.out, questions, state)

    by_mode = generated_outcomes(state["records"])
    generated = {mode: [r["right"] for r in records] for mode, records in by_mode.items()}
    loglik = {} if "accuracy" in args.skipped else in_process_outcomes(args, questions, bridges, state["notes"])
    if loglik or generated:
        summaries = {mode: acc.summarize_outcomes(questions, values) for mode, values in loglik.items()}
        results["accuracy"] = assemble_accuracy(summaries, generated_accuracy(questions, by_mode))
        results["comparisons"] = compare_with_c2c(loglik, generated)

    if "wire" not in args.skipped:
        results["wire"] = run_wire_benchmark(state["shapes"] or local_shapes(bridges), args.wire_max_tokens,
                                             args.wire_repeats)
        if any(r["mode"] == "c2c" and "error" not in r for r in state["records"]):
            results["wire"]["share_of_c2c"], results["wire"]["share_of_c2c_detail"] = share_of_c2c(state["records"])

    results = {"meta": run_meta(args, bridges, questions, stack, started, load_at_start), **results}
    results["targets"] = check_targets(results)
    write_outputs(args.out, results)
    print(f"wrote {args.out / 'RESULTS.md'}")
    return 0
