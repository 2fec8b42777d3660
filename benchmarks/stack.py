"""The bridges under test and the stack that serves them: the default stack, started on free ports."""

from __future__ import annotations

import argparse
import logging
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cachetalk.bridges.store import Bridge, default_bridge_dir, load_bridge
from cachetalk.client import Client

logger = logging.getLogger(__name__)

DEFAULT_BRIDGE = "gemma3-270m-to-smollm2-135m"
DEFAULT_SELF_BRIDGE = "smollm2-135m-to-smollm2-135m"


@dataclass
class Bridges:
    """The bridge under test and the self bridge, with their folder names (the broker's bridge names)."""

    bridge: Bridge
    folder: Path
    self_bridge: Bridge | None
    self_folder: Path | None

    @property
    def receiver(self) -> str:
        return self.bridge.card["receiver"]

    @property
    def sharer(self) -> str:
        return self.bridge.card["sharer"]


def load_bridges(args: argparse.Namespace) -> Bridges:
    folder = Path(args.bridge or default_bridge_dir() / DEFAULT_BRIDGE).resolve()
    self_folder = Path(args.self_bridge or default_bridge_dir() / DEFAULT_SELF_BRIDGE).resolve()
    if not self_folder.exists() and not args.self_bridge:
        logger.warning("no self bridge at %s: the self row is left out", self_folder)
        return Bridges(load_bridge(folder), folder, None, None)
    return Bridges(load_bridge(folder), folder, load_bridge(self_folder), self_folder)


def check_broker_bridges(client: Client, bridges: Bridges) -> None:
    """Raise RuntimeError unless the broker has loaded the same bridges the in-process scoring uses."""
    loaded = {card.name: card for card in client.bridges()}
    for bridge, folder in ((bridges.bridge, bridges.folder), (bridges.self_bridge, bridges.self_folder)):
        if bridge is None:
            continue
        card = loaded.get(folder.name)
        expected = (bridge.card["sharer_fingerprint"], bridge.card["receiver_fingerprint"])
        if card is None or (card.sharer_fingerprint, card.receiver_fingerprint) != expected:
            raise RuntimeError(f"the broker has no bridge {folder.name} trained for the models of {folder}; "
                               f"bridges loaded: {sorted(loaded)}. Start the broker with that bridge folder")


@contextmanager
def bench_stack(args: argparse.Namespace, bridges: Bridges) -> Iterator[str]:
    """Start the default stack (`cachetalk up`) on free ports with the bench's bridges; yield the broker URL.

    The broker loads bridges by folder, so both bridge folders are linked into one
    temporary folder under their own names (the broker's bridge names).
    """
    from cachetalk.server import stack as stack_module

    receiver, sharer = stack_module.RECEIVER, stack_module.SHARER
    if (bridges.receiver, bridges.sharer) != (receiver, sharer):
        raise SystemExit(f"the default stack serves {sharer} -> {receiver}, but bridge {bridges.folder} is for "
                         f"{bridges.sharer} -> {bridges.receiver}; start agents for that pair and pass --broker-url")
    with tempfile.TemporaryDirectory(prefix="cachetalk-bench-") as run_dir:
        bridge_root = Path(run_dir) / "bridges"
        bridge_root.mkdir()
        for folder in (bridges.folder, bridges.self_folder):
            if folder is not None:
                (bridge_root / folder.name).symlink_to(folder, target_is_directory=True)

        # Parse `cachetalk up` options, so that its defaults (such as threads per agent) apply.
        parser = argparse.ArgumentParser()
        stack_module.add_arguments(parser)
        options = ["--port", "0", "--receiver-port", "0", "--sharer-port", "0", "--bridges", str(bridge_root),
                   "--t2t-max-tokens", str(args.t2t_max_tokens), "--log-dir", str(args.out / "logs")]
        if args.agent_threads:
            options += ["--threads", str(args.agent_threads)]
        if args.max_batch:
            options += ["--max-batch", str(args.max_batch)]
        settings = parser.parse_args(options)
        settings.log_level = "INFO"
        args.agent_threads = settings.threads
        stack = stack_module.Stack(settings, Path(run_dir))
        # SIGTERM would otherwise end the bench without stopping the processes it started.
        previous = signal.signal(signal.SIGTERM, stack_module.raise_stopped)
        try:
            stack.start()
            stack.wait_healthy(timeout=600)
            yield stack.broker_url
        finally:
            stack.stop()
            signal.signal(signal.SIGTERM, previous)
