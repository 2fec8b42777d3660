"""The `cachetalk` command. Each subcommand lives in the module that implements it.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; only the
module of the subcommand being run is imported, so `cachetalk --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "agent": ("cachetalk.server.agent", "serve one model: OpenAI-compatible API plus KV cache export and import"),
    "broker": ("cachetalk.server.broker", "route requests between agents and apply bridges (c2c, t2t, solo)"),
    "up": ("cachetalk.server.stack", "start the default stack (two agents and the broker) as local processes"),
    "models": ("cachetalk.server.models_cli", "fetch and convert the default models into the local cache"),
    "bridge": ("cachetalk.bridges.cli", "train and evaluate bridges between two models"),
    "bench": ("cachetalk.benchmarks.run", "measure accuracy and latency of c2c against t2t and solo"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="cachetalk", description="Language-model agents that talk by KV cache.")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        subparsers.add_parser(name, help=summary, add_help=False)

    # Build the full parser of the one subcommand named on the command line: the first
    # word left once the top-level options and their values are taken out.
    top_level = argparse.ArgumentParser(add_help=False)
    top_level.add_argument("--log-level")
    _, rest = top_level.parse_known_args(argv)
    chosen = next((a for a in rest if not a.startswith("-")), None)
    if chosen in COMMANDS:
        module = importlib.import_module(COMMANDS[chosen][0])
        sub = subparsers.choices[chosen]
        sub.add_argument("-h", "--help", action="help", help="show this help message and exit")
        sub.description = COMMANDS[chosen][1]
        module.add_arguments(sub)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
