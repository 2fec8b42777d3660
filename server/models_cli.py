"""`cachetalk models fetch`: download and convert models ahead of time."""

from __future__ import annotations

import argparse

from cachetalk.server.fetch import DEFAULT_MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["fetch"], help="fetch: download and convert into the local cache")
    parser.add_argument("names", nargs="*", default=list(DEFAULT_MODELS),
                        help=f"models to fetch (default: {' '.join(DEFAULT_MODELS)})")


def run(args: argparse.Namespace) -> int:
    from cachetalk.server.models import load_model

    for name in args.names:
        lm = load_model(name)
        print(f"{lm.name}: {lm.num_layers} layers, {lm.num_kv_heads} KV heads, head_dim {lm.head_dim}, "
              f"fingerprint {lm.fingerprint}, folder {lm.source}")
    return 0
