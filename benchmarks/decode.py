"""Decode throughput of one agent at several levels of concurrency.

    python -m cachetalk.benchmarks.decode --agent-url http://127.0.0.1:8001

Each request is a short chat with `ignore_eos`, so every request decodes exactly
`--max-tokens` tokens and the levels compare like with like. Start the agent with
`--max-batch 1` to measure it without decode batching.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx

from cachetalk.benchmarks.stats import summarize_ms


async def run_level(agent_url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """Send `requests` chats, `concurrency` at a time; return tokens/s, requests/s and latencies."""
    latencies: list[float] = []
    tokens = 0
    pending = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for index in pending:
            body = {"messages": [{"role": "user", "content": f"Write story number {index} about a lighthouse."}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            started = time.perf_counter()
            response = await client.post(f"{agent_url}/v1/chat/completions", json=body)
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1e3)
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=1800) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "wall_s": wall_s, "tokens_per_s": tokens / wall_s,
            "requests_per_s": requests / wall_s, **summarize_ms(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agent-url", default="http://127.0.0.1:8001", help="agent to measure (default %(default)s)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default %(default)s)")
    parser.add_argument("--requests-per-level", type=int, default=16, help="requests per level (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default %(default)s)")
    args = parser.parse_args()

    results = {}
    for level in (int(value) for value in args.concurrency.split(",")):
        result = asyncio.run(run_level(args.agent_url, level, max(level, args.requests_per_level), args.max_tokens))
        results[str(level)] = result
        print(f"concurrency {level:>3}: {result['tokens_per_s']:6.1f} tokens/s, {result['requests_per_s']:.2f} "
              f"requests/s, median {result['median_ms']:.0f} ms")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
