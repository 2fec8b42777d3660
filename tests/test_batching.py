"""Batched decoding on the real default models: a batched step computes what separate steps do.

Batched and separate forward passes differ by float rounding only, so logits are compared
with a tolerance and greedy choices exactly.
"""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from cachetalk.benchmarks import decode as decode_benchmark
from cachetalk.server.batching import StepBatcher, batched_step
from cachetalk.server.kv import prefill

pytestmark = pytest.mark.slow

LOGIT_TOLERANCE = 1e-3


def prompts_for(lm, long_repeats: int) -> list[list[int]]:
    """Prompts of different lengths; the longest repeats a sentence `long_repeats` times."""
    sentence = "The lighthouse keeper counted the ships that passed the harbour. "
    texts = ["Hello", sentence * 3, sentence * long_repeats, "What is the capital of France?"]
    return [list(lm.tokenizer.encode(text)) for text in texts]


@pytest.fixture(params=["receiver", "sharer"])
def model_and_prompts(request, one_thread):
    lm = request.getfixturevalue(request.param)
    # Gemma 3's longest prompt passes its 512-token sliding window.
    return lm, prompts_for(lm, 60 if request.param == "sharer" else 12)


def test_batched_step_matches_separate_steps(model_and_prompts):
    lm, prompts = model_and_prompts
    states = [prefill(lm, prompt) for prompt in prompts]
    tokens = [int(logits.argmax()) for _, logits in states]
    separate = [prefill(lm, [token], prefill(lm, prompt)[0]) for prompt, token in zip(prompts, tokens)]

    batched = batched_step(lm, [cache for cache, _ in states], tokens)

    for prompt, (cache, logits), (expected_cache, expected_logits) in zip(prompts, batched, separate):
        assert cache.get_seq_length() == len(prompt) + 1
        torch.testing.assert_close(logits, expected_logits, atol=LOGIT_TOLERANCE, rtol=0)
        assert int(logits.argmax()) == int(expected_logits.argmax())
        for layer, expected in zip(cache.layers, expected_cache.layers):
            torch.testing.assert_close(layer.keys, expected.keys, atol=LOGIT_TOLERANCE, rtol=0)
            torch.testing.assert_close(layer.values, expected.values, atol=LOGIT_TOLERANCE, rtol=0)


def test_batched_caches_keep_decoding(model_and_prompts):
    """A row handed back by one batched step is a valid cache for the next one."""
    lm, prompts = model_and_prompts
    caches = [prefill(lm, prompt)[0] for prompt in prompts]
    references = [prefill(lm, prompt)[0] for prompt in prompts]
    for token in (11, 12, 13):
        stepped = batched_step(lm, caches, [token] * len(caches))
        caches = [cache for cache, _ in stepped]
        for index, (_, logits) in enumerate(stepped):
            references[index], expected = prefill(lm, [token], references[index])
            torch.testing.assert_close(logits, expected, atol=LOGIT_TOLERANCE, rtol=0)


def run_members(batcher: StepBatcher, lm, prompts: list[list[int]], tokens: list[int]) -> list[list[torch.Tensor]]:
    """Each prompt in its own thread, stepping through `tokens` via `batcher`; the logits of each step."""
    start = threading.Barrier(len(prompts))

    def member(prompt: list[int]) -> list[torch.Tensor]:
        cache, _ = prefill(lm, prompt)
        seen = []
        with batcher.member():
            start.wait()
            for token in tokens:
                cache, logits = batcher.step(cache, token)
                seen.append(logits)
        return seen

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(member, prompts))


def test_batcher_runs_concurrent_members_together(receiver, one_thread):
    prompts = prompts_for(receiver, 12)
    tokens = [21, 22, 23, 24]
    sizes: list[int] = []
    # A long gather wait: the leader always waits for every member, so each step is one batch.
    batcher = StepBatcher(receiver, threading.Lock(), max_batch=8, observe=sizes.append, gather_s=60)

    results = run_members(batcher, receiver, prompts, tokens)

    assert sizes == [len(prompts)] * len(tokens)
    for prompt, seen in zip(prompts, results):
        cache, _ = prefill(receiver, prompt)
        for token, logits in zip(tokens, seen):
            cache, expected = prefill(receiver, [token], cache)
            torch.testing.assert_close(logits, expected, atol=LOGIT_TOLERANCE, rtol=0)


def test_batcher_respects_its_limits(receiver, one_thread):
    prompts = prompts_for(receiver, 12)
    sizes: list[int] = []
    by_rows = StepBatcher(receiver, threading.Lock(), max_batch=2, observe=sizes.append, gather_s=60)
    run_members(by_rows, receiver, prompts, [5, 6])
    assert max(sizes) == 2
    assert sum(sizes) == len(prompts) * 2

    sizes.clear()
    # No two caches fit in one padded position: every step runs alone, as a lone one always may.
    by_tokens = StepBatcher(receiver, threading.Lock(), max_batch=8, max_batch_tokens=1, observe=sizes.append,
                            gather_s=60)
    run_members(by_tokens, receiver, prompts, [5, 6])
    assert sizes == [1] * (len(prompts) * 2)


def batch_histogram(agent_url: str) -> tuple[float, float]:
    text = httpx.get(f"{agent_url}/metrics", timeout=30).text
    count = float(re.search(r"^cachetalk:decode_batch_size_count\{[^}]*\} (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^cachetalk:decode_batch_size_sum\{[^}]*\} (\S+)$", text, re.M).group(1))
    return count, total


def test_agent_batches_concurrent_requests(smollm_agent):
    count_before, sum_before = batch_histogram(smollm_agent.url)
    body = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}

    def ask(index: int) -> dict:
        messages = [{"role": "user", "content": f"Tell story number {index} about a cat."}]
        response = httpx.post(f"{smollm_agent.url}/v1/chat/completions", json={**body, "messages": messages},
                              timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))

    assert [answer["usage"]["completion_tokens"] for answer in answers] == [40] * 4
    count, total = batch_histogram(smollm_agent.url)
    steps, rows = count - count_before, total - sum_before
    assert rows == 4 * 39  # every token after the first comes from one decode step
    assert steps < rows  # some steps carried more than one request


def test_decode_benchmark_counts_every_token(smollm_agent):
    result = asyncio.run(decode_benchmark.run_level(smollm_agent.url, concurrency=2, requests=3, max_tokens=5))
    assert result["requests"] == 3
    assert result["n"] == 3
    assert result["tokens_per_s"] == pytest.approx(15 / result["wall_s"])
