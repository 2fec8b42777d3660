"""The three ways the broker serves a chat request: solo, t2t and c2c.

Each mode is an async generator of `Piece` (answer text, as the receiver writes it)
ending with one `Outcome` (finish reason, usage, per-stage timings). The HTTP layer
turns them into a JSON response or a stream.

- solo: the receiver answers alone, through its `/v1/chat/completions`.
- t2t: each sharer first answers the conversation in text (greedy, at most
  `t2t_max_tokens` tokens); the receiver then reads those answers in a system message
  put before the conversation (see `with_sharer_notes`) and answers.
- c2c: the sharers and the receiver prefill the prompt except its last token; the
  bridges fuse the sharers' caches into the receiver's; the receiver generates from the
  fused cache plus the last prompt token. A sharer serving the receiver's own model
  needs no bridge: its cache is handed over as is and the receiver does not prefill.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import msgpack

from cachetalk.client import wire
from cachetalk.server.broker_agents import AgentClient
from cachetalk.server.broker_bridges import BridgeRegistry, RegisteredBridge, fuse_in_order, layers_to_wire
from cachetalk.server.broker_tokenizers import TokenizerStore
from cachetalk.server.kv import wire_layers
from cachetalk.server.errors import APIError

STAGES = ("tokenize", "sharer_prefill", "sharer_decode", "receiver_prefill", "transfer", "serialization", "bridge",
          "decode", "total")

T2T_PREAMBLE = ("Other assistants read this conversation and wrote the notes below. They may be wrong; "
                "use them only if they help you answer.")


@dataclass
class ChatRequest:
    id: str
    receiver: str
    sharers: list[str]
    mode: str  # "c2c", "t2t" or "solo"
    bridge: str | None  # a bridge name the client asked for, else the default for each pair
    messages: list[dict]
    sampling: dict  # the sampling fields the client set, as the agents' APIs name them


@dataclass
class Piece:
    text: str


@dataclass
class Outcome:
    finish_reason: str | None
    usage: dict
    timings: dict[str, float | None]
    bridge: list[str | None] | None = None
    notes: list[dict] | None = None  # t2t: each sharer's text message, {"sharer", "text"}


@dataclass
class Timer:
    """Milliseconds per stage; a stage that did not run stays None."""

    started: float = field(default_factory=time.perf_counter)
    ms: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(STAGES))

    def add(self, stage: str, ms: float) -> None:
        self.ms[stage] = (self.ms[stage] or 0.0) + max(ms, 0.0)

    def since(self, start: float) -> float:
        return (time.perf_counter() - start) * 1000

    def finish(self) -> dict[str, float | None]:
        self.ms["total"] = self.since(self.started)
        return {f"{stage}_ms": None if ms is None else round(ms, 2) for stage, ms in self.ms.items()}


@dataclass
class BrokerContext:
    """State shared by the modes: the agents by name, the bridges, the tokenizers and the t2t budget."""

    agents: dict[str, AgentClient]
    bridges: BridgeRegistry
    tokenizers: TokenizerStore
    t2t_max_tokens: int = 256


async def all_or_cancel(*calls: Awaitable) -> list:
    """Await the calls concurrently; when one fails, cancel the others and raise its error."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except* APIError as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


def _chat_events_text(event: dict) -> tuple[str, str | None]:
    choices = event.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or "", choices[0].get("finish_reason")


async def _receiver_chat(ctx: BrokerContext, request: ChatRequest, messages: list[dict],
                         timer: Timer) -> AsyncIterator[Piece | Outcome]:
    receiver = ctx.agents[request.receiver]
    body = {"model": receiver.config.served_model, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}, **request.sampling}
    sent = time.perf_counter()
    first = None
    finish_reason, usage = None, {}
    async for event in receiver.stream_chat(body):
        text, reason = _chat_events_text(event)
        usage = event.get("usage") or usage
        if first is None and (text or reason):
            first = time.perf_counter()
        finish_reason = reason or finish_reason
        if text:
            yield Piece(text)

    # Time to first token stands for the receiver's prefill; the rest is decoding.
    first = first or time.perf_counter()
    timer.add("receiver_prefill", (first - sent) * 1000)
    timer.add("decode", timer.since(first))
    yield Outcome(finish_reason, usage, timer.finish())


async def solo(ctx: BrokerContext, request: ChatRequest) -> AsyncIterator[Piece | Outcome]:
    async for item in _receiver_chat(ctx, request, request.messages, Timer()):
        yield item


async def _sharer_note(ctx: BrokerContext, sharer: AgentClient, messages: list[dict], timer: Timer) -> str:
    body = {"model": sharer.config.served_model, "messages": messages, "max_tokens": ctx.t2t_max_tokens,
            "temperature": 0,
            "stream": True}
    sent = time.perf_counter()
    first = None
    parts = []
    async for event in sharer.stream_chat(body):
        text, reason = _chat_events_text(event)
        if first is None and (text or reason):
            first = time.perf_counter()
        parts.append(text)
    first = first or time.perf_counter()
    timer.add("sharer_prefill", (first - sent) * 1000)
    timer.add("sharer_decode", timer.since(first))
    return "".join(parts).strip()


def with_sharer_notes(messages: list[dict], notes: list[tuple[str, str]]) -> list[dict]:
    """Put the sharers' notes in a system message before the conversation.

    The system message reads: `T2T_PREAMBLE`, then per sharer "Notes from NAME:" and
    its text. A conversation that starts with a system message keeps it, and the notes
    follow it in the same message.
    """
    block = "\n\n".join([T2T_PREAMBLE] + [f"Notes from {name}:\n{text}" for name, text in notes])
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0], content=f"{messages[0].get('content') or ''}\n\n{block}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


async def t2t(ctx: BrokerContext, request: ChatRequest) -> AsyncIterator[Piece | Outcome]:
    timer = Timer()
    sharers = [ctx.agents[name] for name in request.sharers]
    texts = await all_or_cancel(*(_sharer_note(ctx, s, request.messages, timer) for s in sharers))
    messages = with_sharer_notes(request.messages, list(zip(request.sharers, texts)))
    async for item in _receiver_chat(ctx, request, messages, timer):
        if isinstance(item, Outcome):
            item.notes = [{"sharer": name, "text": text} for name, text in zip(request.sharers, texts)]
        yield item


@dataclass
class _Plan:
    """For each sharer, its bridge (None: same model as the receiver, handed over as is)."""

    sharers: list[AgentClient]
    bridges: list[RegisteredBridge | None]

    @property
    def handoff(self) -> AgentClient | None:
        return next((s for s, b in zip(self.sharers, self.bridges) if b is None), None)

    @property
    def bridged(self) -> list[tuple[AgentClient, RegisteredBridge]]:
        return [(s, b) for s, b in zip(self.sharers, self.bridges) if b is not None]


async def _plan(ctx: BrokerContext, request: ChatRequest) -> _Plan:
    receiver = ctx.agents[request.receiver]
    sharers = [ctx.agents[name] for name in request.sharers]
    infos = await all_or_cancel(receiver.model_info(), *(s.model_info() for s in sharers))
    bridges = [ctx.bridges.choose(s.name, info, receiver.name, infos[0], request.bridge)
               for s, info in zip(sharers, infos[1:])]
    if request.bridge is not None and request.bridge not in [b.name for b in bridges if b is not None]:
        chosen = ctx.bridges.bridges[request.bridge]
        raise APIError(400, f"bridge {request.bridge} ({chosen.pair}) fits none of the sharers {request.sharers} "
                       f"with receiver {request.receiver}", param="cachetalk.bridge", code="bridge_mismatch")
    return _Plan(sharers, bridges)


async def _align(ctx: BrokerContext, request: ChatRequest, plan: _Plan) -> tuple[list[int], dict[str, list[int]]]:
    """Tokenize for the receiver and align each bridged sharer: (receiver ids, sharer name -> ids)."""
    from cachetalk.bridges.align import align_tokens

    receiver = ctx.agents[request.receiver]
    tokenizers = await all_or_cancel(ctx.tokenizers.get(receiver), *(ctx.tokenizers.get(s) for s in plan.sharers))
    receiver_tok = tokenizers[0]

    def align_all() -> tuple[list[int], dict[str, list[int]]]:
        receiver_ids: list[int] = []
        sharer_ids = {}
        for sharer, tok in zip(plan.sharers, tokenizers[1:]):
            r_ids, s_ids = align_tokens(receiver_tok, tok, request.messages, add_generation_prompt=True)
            receiver_ids = receiver_ids or r_ids
            sharer_ids[sharer.name] = s_ids
        return receiver_ids, sharer_ids

    receiver_ids, sharer_ids = await asyncio.to_thread(align_all)
    if len(receiver_ids) < 2:
        raise APIError(400, "the prompt is a single token; c2c needs at least two", param="messages")
    return receiver_ids, sharer_ids


async def _prefill_all(ctx: BrokerContext, request: ChatRequest, plan: _Plan, receiver_ids: list[int],
                       sharer_ids: dict[str, list[int]], timer: Timer) -> tuple[bytes, list[bytes]]:
    """Prefill concurrently: the receiver (or the same-model sharer) and the bridged sharers.

    Returns the wire bytes of the base receiver cache and of each bridged sharer's cache.
    """
    base_agent = plan.handoff or ctx.agents[request.receiver]
    calls = [base_agent.prefill(receiver_ids[:-1])]
    calls += [sharer.prefill(sharer_ids[sharer.name][:-1]) for sharer, _ in plan.bridged]
    started = time.perf_counter()
    results = await all_or_cancel(*calls)
    wall = timer.since(started)

    base_ms = results[0][1]
    timer.add("sharer_prefill" if plan.handoff else "receiver_prefill", base_ms)
    for _, prefill_ms, _ in results[1:]:
        timer.add("sharer_prefill", prefill_ms)
    timer.add("transfer", wall - max(r[1] for r in results))
    return results[0][0], [r[0] for r in results[1:]]


def _fuse(plan: _Plan, base: bytes, sharer_caches: list[bytes], timer: Timer) -> bytes:
    """Decode, fuse and encode (torch work, run in a thread)."""
    started = time.perf_counter()
    base_kv = wire.decode(base)
    if not plan.bridged:
        timer.add("serialization", timer.since(started))
        return base  # same-model handoff only: the cache passes untouched
    receiver_layers = wire_layers(base_kv)
    sharer_layers = [wire_layers(wire.decode(cache)) for cache in sharer_caches]
    timer.add("serialization", timer.since(started))

    started = time.perf_counter()
    fused = fuse_in_order(receiver_layers, [(b, layers) for (_, b), layers in zip(plan.bridged, sharer_layers)])
    timer.add("bridge", timer.since(started))

    started = time.perf_counter()
    encoded = wire.encode(layers_to_wire(base_kv.header, fused))
    timer.add("serialization", timer.since(started))
    return encoded


def _generate_body(request: ChatRequest, cache: bytes, last_token: list[int]) -> bytes:
    body = {"cache": cache, "token_ids": last_token, "stream": True, "request_id": request.id}
    for name in ("max_tokens", "temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "ignore_eos"):
        if request.sampling.get(name) is not None:
            body[name] = request.sampling[name]
    stop = request.sampling.get("stop")
    if stop:
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return msgpack.packb(body, use_bin_type=True)


async def c2c(ctx: BrokerContext, request: ChatRequest) -> AsyncIterator[Piece | Outcome]:
    timer = Timer()
    plan = await _plan(ctx, request)
    started = time.perf_counter()
    receiver_ids, sharer_ids = await _align(ctx, request, plan)
    timer.add("tokenize", timer.since(started))
    base, sharer_caches = await _prefill_all(ctx, request, plan, receiver_ids, sharer_ids, timer)
    cache = await asyncio.to_thread(_fuse, plan, base, sharer_caches, timer)

    receiver = ctx.agents[request.receiver]
    sent = time.perf_counter()
    finish_reason, usage, agent_timings = None, {}, {}
    async for event in receiver.stream_generate(_generate_body(request, cache, receiver_ids[-1:])):
        if event.get("text"):
            yield Piece(event["text"])
        finish_reason = event.get("finish_reason") or finish_reason
        usage = event.get("usage") or usage
        agent_timings = event.get("timings") or agent_timings

    compute_ms = sum(float(agent_timings.get(k) or 0) for k in ("import_ms", "prefill_ms", "decode_ms"))
    timer.add("serialization", float(agent_timings.get("import_ms") or 0))
    timer.add("decode", float(agent_timings.get("prefill_ms") or 0) + float(agent_timings.get("decode_ms") or 0))
    timer.add("transfer", timer.since(sent) - compute_ms)

    completion = int(usage.get("completion_tokens") or 0)
    usage = {"prompt_tokens": len(receiver_ids), "completion_tokens": completion,
             "total_tokens": len(receiver_ids) + completion}
    yield Outcome(finish_reason, usage, timer.finish(), bridge=[b.name if b else None for b in plan.bridges])


MODES = {"solo": solo, "t2t": t2t, "c2c": c2c}
