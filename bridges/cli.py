"""`cachetalk bridge train` and `cachetalk bridge eval`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from cachetalk.bridges.data import DataUnavailableError, load_samples
from cachetalk.bridges.evaluate import evaluate, format_table
from cachetalk.bridges.store import load_bridge, save_bridge, update_card
from cachetalk.bridges.train import TrainConfig, encode_sample, new_fuser, train
from cachetalk.server.models import load_model

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = actions.add_parser("train", help="train a bridge from a sharer into a receiver")
    t.add_argument("--sharer", help="sharer model (short name, folder, GGUF file or hub id)")
    t.add_argument("--receiver", required=True, help="receiver model")
    t.add_argument("--self", dest="self_bridge", action="store_true",
                   help="train a self bridge: the receiver is its own sharer (the baseline for C2C)")
    t.add_argument("--data", required=True, help="JSONL file of {\"messages\": [...]} or bigbench:TASK,TASK,...")
    t.add_argument("--out", required=True, type=Path, help="bridge folder to write")
    t.add_argument("--hidden", type=int, default=128, help="hidden width of each projector")
    t.add_argument("--depth", type=int, default=1, help="residual MLP blocks per projector")
    group = t.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, help="optimizer steps")
    group.add_argument("--epochs", type=float, help="passes over the training samples (default 1)")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW")
    t.add_argument("--batch", type=int, default=8, help="samples per optimizer step")
    t.add_argument("--max-per-task", type=int, help="cap on training samples per BIG-bench task")
    t.add_argument("--max-prompt-tokens", type=int, default=384, help="longer prompts lose their middle")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, sample order, dropout and gates")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--val-every", type=int, default=0, help="validation loss every N steps (0: never)")
    t.add_argument("--val-samples", type=int, default=32, help="validation samples (BIG-bench validation split)")
    t.add_argument("--checkpoint-every", type=int, default=25, help="checkpoint every N steps")
    t.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the saved weights")

    e = actions.add_parser("eval", help="multiple-choice accuracy of receiver, sharer, C2C and self bridge")
    e.add_argument("--bridge", required=True, type=Path, help="bridge folder (sharer -> receiver)")
    e.add_argument("--self-bridge", type=Path, help="self bridge folder (receiver -> receiver)")
    e.add_argument("--data", required=True, help="bigbench:TASK,TASK,..., gpqa (GPQA Diamond) or a JSONL file "
                   "with options")
    e.add_argument("--split", default="test", choices=["train", "validation", "test", "all"])
    e.add_argument("--limit", type=int, help="questions per task at most")
    e.add_argument("--max-prompt-tokens", type=int, default=384, help="longer prompts lose their middle")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--out", type=Path, help="write the results as JSON here")
    e.add_argument("--record", action="store_true", help="also store the results in the bridge card")


def command_line() -> str:
    return "cachetalk " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_train(args) -> int:
    if not args.self_bridge and not args.sharer:
        print("missing --sharer MODEL (or --self for a self bridge)", file=sys.stderr)
        return 2
    if args.self_bridge and args.sharer not in (None, args.receiver):
        print(f"--self trains {args.receiver} -> {args.receiver}; drop --sharer {args.sharer}", file=sys.stderr)
        return 2
    receiver = load_model(args.receiver)
    sharer = receiver if args.self_bridge else load_model(args.sharer)

    samples = load_samples(args.data, "train", args.max_per_task)
    encoded = [encode_sample(receiver, sharer, s.messages, args.max_prompt_tokens) for s in samples]
    validation = []
    if args.val_every and args.data.startswith("bigbench:"):
        held_out = load_samples(args.data, "validation", max(1, args.val_samples // 4))[:args.val_samples]
        validation = [encode_sample(receiver, sharer, s.messages, args.max_prompt_tokens) for s in held_out]
    steps = args.steps or math.ceil((args.epochs or 1.0) * len(encoded) / args.batch)
    logger.info("training %s -> %s on %d samples: %d steps of %d", sharer.name, receiver.name,
                len(encoded), steps, args.batch)

    torch.manual_seed(args.seed)
    fuser = new_fuser(receiver, sharer, args.hidden, args.depth)
    config = TrainConfig(steps=steps, batch=args.batch, lr=args.lr, seed=args.seed, val_every=args.val_every,
                         checkpoint_every=args.checkpoint_every, max_prompt_tokens=args.max_prompt_tokens)
    state = train(fuser, receiver, None if args.self_bridge else sharer, encoded, config, args.out,
                  validation, args.resume)

    card = {
        "sharer": sharer.name, "receiver": receiver.name,
        "sharer_fingerprint": sharer.fingerprint, "receiver_fingerprint": receiver.fingerprint,
        "self_bridge": args.self_bridge,
        "training": {
            "data": args.data, "split": "train", "max_per_task": args.max_per_task, "samples": len(encoded),
            "max_prompt_tokens": args.max_prompt_tokens, "steps": steps, "batch": args.batch, "lr": args.lr,
            "weight_decay": config.weight_decay, "warmup": config.warmup, "clip": config.clip,
            "seed": args.seed, "seconds": round(state["seconds"], 1),
            "first_loss": round(sum(state["losses"][:10]) / max(1, len(state["losses"][:10])), 4),
            "last_loss": round(sum(state["losses"][-10:]) / max(1, len(state["losses"][-10:])), 4),
            "validation_loss": state["validation"], "torch_threads": torch.get_num_threads(),
            "command": command_line(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_bridge(args.out, fuser, card, args.dtype)
    print(f"saved {args.out} after {steps} steps in {state['seconds']:.0f} s "
          f"(loss {card['training']['first_loss']} -> {card['training']['last_loss']})")
    return 0


def run_eval(args) -> int:
    bridge = load_bridge(args.bridge)
    receiver = load_model(bridge.card["receiver"])
    sharer = load_model(bridge.card["sharer"])
    bridge.check(sharer.fingerprint, receiver.fingerprint)
    self_bridge = None
    if args.self_bridge:
        self_bridge = load_bridge(args.self_bridge)
        self_bridge.check(receiver.fingerprint, receiver.fingerprint)

    samples = load_samples(args.data, args.split, args.limit)
    results = evaluate(samples, receiver, sharer, bridge, self_bridge, args.max_prompt_tokens)
    results.update({"data": args.data, "split": args.split, "limit": args.limit, "command": command_line(),
                    "bridge": str(args.bridge), "self_bridge": str(args.self_bridge) if args.self_bridge else None})
    print(format_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.record:
        card = load_bridge(args.bridge).card
        evaluations = card.get("evaluation", []) + [results]
        update_card(args.bridge, evaluation=evaluations)
    return 0


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_train(args) if args.action == "train" else run_eval(args)
    except DataUnavailableError as exc:
        logger.error("%s", exc)
        return 1
