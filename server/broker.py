"""The broker: one OpenAI-compatible endpoint in front of the agents, routing c2c, t2t and solo.

    cachetalk broker --config broker.yaml [--host 127.0.0.1] [--port 8000]

`model` names the receiver. The `cachetalk` object in the body (the OpenAI SDK sends
it with `extra_body`) names the sharers and the mode:

    {"model": "smollm2-135m", "messages": [...],
     "cachetalk": {"sharers": ["gemma3-270m"], "mode": "c2c", "bridge": null}}

The mode defaults to c2c when sharers are named and to solo otherwise; `bridge` picks
a bridge by name where several fit a pair. Every response carries
`cachetalk: {mode, sharers, bridge, timings}`; a stream carries it in its last chunk.
Routes: `/v1/chat/completions`, `/v1/models`, `/v1/agents`, `/v1/bridges`, `/health`,
`/metrics`. See `broker_config` for the config file and `broker_modes` for the modes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cachetalk.server.broker_agents import AgentClient
from cachetalk.server.broker_bridges import BridgeRegistry
from cachetalk.server.broker_config import BrokerConfig, ConfigError, load_config
from cachetalk.server.broker_modes import BrokerContext, ChatRequest
from cachetalk.server.broker_responses import ClientGone, log_details, respond_json, respond_stream
from cachetalk.server.broker_tokenizers import TokenizerStore
from cachetalk.server.errors import APIError, install_error_handlers
from cachetalk.server.metrics import CONTENT_TYPE, LATENCY_BUCKETS, ServerMetrics
from cachetalk.server.middleware import RequestLogMiddleware

logger = logging.getLogger(__name__)

BROKER_PATHS = frozenset({"/health", "/metrics", "/v1/models", "/v1/agents", "/v1/bridges", "/v1/chat/completions"})


class Extension(BaseModel):
    """The `cachetalk` object of a chat request."""

    model_config = ConfigDict(extra="forbid")
    sharers: list[str] = []
    mode: Literal["c2c", "t2t", "solo"] | None = None
    bridge: str | None = None


class ChatBody(BaseModel):
    """The fields of `/v1/chat/completions` the broker reads; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    ignore_eos: bool = False
    stream_options: dict | None = None
    cachetalk: Extension = Extension()

    @field_validator("messages")
    @classmethod
    def _flatten_content(cls, messages: list[dict]) -> list[dict]:
        """Keep role and text; list content (OpenAI text parts) is joined into one string."""
        flat = []
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str):
                raise ValueError(f"messages[{index}] has no role")
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            if content is not None and not isinstance(content, str):
                raise ValueError(f"messages[{index}].content must be a string or a list of text parts")
            flat.append({"role": role, "content": content or ""})
        return flat


class BrokerMetrics(ServerMetrics):
    """Request counts plus per-stage latency histograms by mode."""

    def __init__(self):
        super().__init__("broker", known_paths=BROKER_PATHS)
        self.stages = Histogram("cachetalk_broker_stage_seconds", "Time per stage of a broker request",
                                ["stage", "mode"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.outcomes = Counter("cachetalk_broker_requests", "Chat requests by mode and outcome",
                                ["mode", "outcome"], registry=self.registry)

    def observe(self, mode: str, timings: dict[str, float | None]) -> None:
        for key, ms in timings.items():
            if ms is not None:
                self.stages.labels(key.removesuffix("_ms"), mode).observe(ms / 1000)


class Broker:
    """The broker's state: config, agent clients, bridges, tokenizers, metrics."""

    def __init__(self, config: BrokerConfig, bridges: BridgeRegistry):
        self.config = config
        timeouts = config.timeouts
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect),
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))
        self.agents = {name: AgentClient(agent, timeouts, self.http) for name, agent in config.agents.items()}
        self.context = BrokerContext(self.agents, bridges, TokenizerStore(), config.t2t_max_tokens)
        self.metrics = BrokerMetrics()
        self.created = int(time.time())
        self.tokenizers_state = "not started"  # then "loading", "ready" or "failed"

    def chat_request(self, body: ChatBody, request_id: str) -> ChatRequest:
        """Check names and modes and build the request the modes run."""
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if body.model not in self.agents:
            raise APIError(404, f"The model `{body.model}` does not exist; agents: {sorted(self.agents)}",
                           param="model", code="model_not_found")
        options = body.cachetalk
        for name in options.sharers:
            if name not in self.agents:
                raise APIError(404, f"unknown sharer {name!r}; agents: {sorted(self.agents)}",
                               param="cachetalk.sharers", code="model_not_found")
        if len(set(options.sharers)) != len(options.sharers):
            raise APIError(400, f"sharers {options.sharers} name an agent twice", param="cachetalk.sharers")

        mode = options.mode or ("c2c" if options.sharers else "solo")
        if mode != "solo" and not options.sharers:
            raise APIError(400, f"mode {mode} needs at least one sharer in cachetalk.sharers",
                           param="cachetalk.sharers")
        sharers = options.sharers if mode != "solo" else []

        sampling = {"max_tokens": body.max_completion_tokens or body.max_tokens, "temperature": body.temperature,
                    "top_p": body.top_p, "seed": body.seed, "stop": body.stop,
                    "frequency_penalty": body.frequency_penalty, "presence_penalty": body.presence_penalty,
                    "ignore_eos": body.ignore_eos or None}
        sampling = {name: value for name, value in sampling.items() if value is not None}
        return ChatRequest(request_id, body.model, sharers, mode, options.bridge, body.messages, sampling)

    async def load_tokenizers(self, retry_s: float = 1.0, give_up_s: float = 900.0) -> None:
        """Fetch every agent's tokenizer ahead of the first c2c request, retrying while agents start."""
        self.tokenizers_state = "loading"
        deadline = time.monotonic() + give_up_s
        pending = list(self.agents.values())
        while pending and time.monotonic() < deadline:
            for agent in list(pending):
                try:
                    await self.context.tokenizers.get(agent)
                    pending.remove(agent)
                except APIError as exc:
                    logger.debug("tokenizer of %s not loaded yet: %s", agent.name, exc.message)
            if pending:
                await asyncio.sleep(retry_s)
        self.tokenizers_state = "ready"
        if pending:
            self.tokenizers_state = "failed"
            logger.warning("gave up loading the tokenizers of %s ahead of time; c2c requests load them",
                           [a.name for a in pending])

    async def health(self) -> dict:
        probes = await asyncio.gather(*(agent.health() for agent in self.agents.values()))
        agents = {name: {"url": agent.url, "status": status, "detail": detail}
                  for (name, agent), (status, detail) in zip(self.agents.items(), probes)}
        # "status" is the broker's own, so it stays "ok" while an agent is down or loading.
        # "ready" is true once every agent serves and every tokenizer is loaded: from then on
        # a c2c request neither gets 503 nor waits for a tokenizer to load.
        ready = self.tokenizers_state == "ready" and all(entry["status"] == "ok" for entry in agents.values())
        return {"status": "ok", "ready": ready, "tokenizers": self.tokenizers_state, "agents": agents}

    async def agent_list(self) -> list[dict]:
        health = (await self.health())["agents"]
        entries = []
        for name, agent in self.agents.items():
            if health[name]["status"] == "ok" and agent.info is None:
                try:
                    await agent.model_info()
                except APIError as exc:
                    logger.warning("cannot read the model info of agent %s: %s", name, exc.message)
            entries.append({"name": name, "url": agent.url, "status": health[name]["status"], "model": agent.info})
        return entries


def create_app(config: BrokerConfig, bridges: BridgeRegistry | None = None) -> FastAPI:
    """Build the broker app; without `bridges`, the bridges of the config load at startup."""
    state: dict[str, Broker] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = bridges or await asyncio.to_thread(BridgeRegistry.load, config.bridge_dirs)
        broker = state["broker"] = Broker(config, registry)
        logger.info("broker ready: agents %s, bridges %s", {n: a.url for n, a in config.agents.items()},
                    registry.describe())
        warm_up = asyncio.create_task(broker.load_tokenizers())
        yield
        warm_up.cancel()
        await broker.http.aclose()

    app = FastAPI(title="cachetalk broker", lifespan=lifespan)
    install_error_handlers(app)

    def count(method: str, path: str, status: int, seconds: float) -> None:
        if "broker" in state:
            state["broker"].metrics.count_request(method, path, status, seconds)

    app.add_middleware(RequestLogMiddleware, on_finish=count)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        broker = state["broker"]
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        body = ChatBody.model_validate(raw)
        request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
        chat = broker.chat_request(body, request_id)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(respond_stream(broker, request, chat, include_usage), media_type="text/event-stream")
        result = "client_disconnected"
        try:
            response = await respond_json(broker, request, chat)
            result = "ok"
            return response
        except APIError as exc:
            result = str(exc.status)
            log_details(request, chat, None)
            raise
        except ClientGone:
            return Response(status_code=499)  # never read, because the client is gone
        except Exception:
            result = "500"
            raise
        finally:
            broker.metrics.outcomes.labels(chat.mode, result).inc()
            request.state.log_details["outcome"] = result

    @app.get("/v1/models")
    async def list_models():
        broker = state["broker"]
        bridges = broker.context.bridges.bridges.values()
        data = [{"id": name, "object": "model", "owned_by": "cachetalk", "created": broker.created,
                 "bridges": [b.name for b in bridges if b.receiver == name]} for name in broker.agents]
        return {"object": "list", "data": data}

    @app.get("/v1/agents")
    async def list_agents():
        return {"object": "list", "data": await state["broker"].agent_list()}

    @app.get("/v1/bridges")
    async def list_bridges():
        registry = state["broker"].context.bridges
        return {"object": "list", "data": [b.summary() for b in registry.bridges.values()]}

    @app.get("/health")
    async def health():
        return await state["broker"].health()

    @app.get("/metrics")
    async def metrics():
        return Response(state["broker"].metrics.render(), media_type=CONTENT_TYPE)

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="broker config file (YAML or TOML): agents, bridges, timeouts")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for applying bridges (default: torch's, one per core)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every call to an agent at INFO
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        config = load_config(args.config)
        bridges = BridgeRegistry.load(config.bridge_dirs)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    app = create_app(config, bridges)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
