"""Throughput of c2c requests through the broker at several levels of concurrency."""

from __future__ import annotations

import asyncio
import logging
import time

from cachetalk.benchmarks.latency import ModeRequest
from cachetalk.benchmarks.stats import summarize_ms
from cachetalk.client import AsyncClient, CachetalkError

logger = logging.getLogger(__name__)


async def run_level(base_url: str, request: ModeRequest, prompts: list[list[dict]], concurrency: int,
                    total: int, max_tokens: int, timeout_s: float) -> dict:
    """Send `total` requests with `concurrency` in flight at once; return requests/s and latencies.

    Prompts are taken in turn from `prompts`. Requests/s counts successful requests over
    the wall time from the first send to the last reply.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(total):
        queue.put_nowait(index)
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(client: AsyncClient) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            started = time.perf_counter()
            try:
                await client.chat(prompts[index % len(prompts)], model=request.model, sharers=list(request.sharers),
                                  mode=request.mode, bridge=request.bridge, max_tokens=max_tokens, temperature=0)
            except CachetalkError as exc:
                logger.error("concurrency %d: request %d failed: %s", concurrency, index, exc)
                errors.append(str(exc))
                continue
            latencies.append((time.perf_counter() - started) * 1e3)

    async with AsyncClient(base_url, timeout=timeout_s) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall_s = time.perf_counter() - started

    result = {"concurrency": concurrency, "requests": total, "errors": len(errors), "wall_s": wall_s,
              "requests_per_s": len(latencies) / wall_s}
    if latencies:
        result.update(summarize_ms(latencies))
    if errors:
        result["first_error"] = errors[0]
    logger.info("concurrency %d: %d requests in %.1f s, %.3f requests/s, %d errors", concurrency, total, wall_s,
                result["requests_per_s"], len(errors))
    return result


def run_concurrency(base_url: str, request: ModeRequest, prompts: list[list[dict]], levels: list[int],
                    requests_per_level: dict[int, int], max_tokens: int, timeout_s: float = 1800.0) -> dict:
    """Measure each concurrency level in turn; keys of the result are the levels as strings (JSON keys)."""
    results: dict = {}
    for level in levels:
        results[str(level)] = asyncio.run(run_level(base_url, request, prompts, level, requests_per_level[level],
                                                    max_tokens, timeout_s))
    first, last = str(levels[0]), str(levels[-1])
    if results[first]["requests_per_s"] > 0:
        results["speedup_highest_over_lowest"] = results[last]["requests_per_s"] / results[first]["requests_per_s"]
    return results
