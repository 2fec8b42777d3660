"""Tokenizers of the agents, fetched once over HTTP and cached on disk by model fingerprint.

The broker needs each agent's exact tokenizer and chat template to align tokens, and
the agent may run on another host, so it sends its tokenizer files
(`GET /v1/tokenizer`). They are stored under `$CACHETALK_HOME/tokenizers/FINGERPRINT/`
and later starts read them from there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cachetalk.server.broker_agents import AgentClient
from cachetalk.server.errors import APIError
from cachetalk.server.fetch import cachetalk_home

logger = logging.getLogger(__name__)

# Tokenizer file names are plain names such as "tokenizer.json". Anything else (a path,
# a hidden file) is rejected, so an agent cannot write outside the cache folder.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SAFE_FINGERPRINT = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class TokenizerStore:
    """Tokenizers by model fingerprint: in memory, then on disk, then from the agent."""

    def __init__(self, root: Path | None = None):
        self.root = root or cachetalk_home() / "tokenizers"
        self._loaded: dict[str, PreTrainedTokenizerBase] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, agent: AgentClient) -> PreTrainedTokenizerBase:
        """Return the tokenizer of the model `agent` serves."""
        fingerprint = (await agent.model_info()).get("fingerprint")
        if not isinstance(fingerprint, str) or not SAFE_FINGERPRINT.match(fingerprint):
            raise APIError(502, f"agent {agent.name} reported an invalid model fingerprint {fingerprint!r}",
                           code="agent_error", error_type="server_error")
        if fingerprint in self._loaded:
            return self._loaded[fingerprint]

        lock = self._locks.setdefault(fingerprint, asyncio.Lock())
        async with lock:
            if fingerprint not in self._loaded:
                folder = self.root / fingerprint
                if not folder.is_dir():
                    await self._download(agent, fingerprint, folder)
                self._loaded[fingerprint] = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(folder))
                logger.info("loaded the tokenizer of %s (fingerprint %s) from %s", agent.name, fingerprint, folder)
        return self._loaded[fingerprint]

    async def _download(self, agent: AgentClient, fingerprint: str, folder: Path) -> None:
        payload = await agent.tokenizer_files()
        if payload.get("fingerprint") != fingerprint:
            raise APIError(502, f"agent {agent.name} sent the tokenizer of fingerprint {payload.get('fingerprint')}, "
                           f"but serves a model of fingerprint {fingerprint}", code="agent_error",
                           error_type="server_error")
        files = payload.get("files")
        if not isinstance(files, dict) or not files:
            raise APIError(502, f"agent {agent.name} sent no tokenizer files", code="agent_error",
                           error_type="server_error")
        await asyncio.to_thread(self._write, folder, files, agent.name)

    @staticmethod
    def _write(folder: Path, files: dict, agent_name: str) -> None:
        # A unique staging folder, renamed at the end: another broker sharing the cache
        # may be writing the same tokenizer at the same time.
        staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        for name, content in files.items():
            if not isinstance(name, str) or not SAFE_NAME.match(name) or not isinstance(content, bytes):
                shutil.rmtree(staging, ignore_errors=True)
                raise APIError(502, f"agent {agent_name} sent an invalid tokenizer file entry {name!r}",
                               code="agent_error", error_type="server_error")
            (staging / name).write_bytes(content)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # the other writer finished first
