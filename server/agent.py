"""`cachetalk agent`: serve one model over HTTP.

The agent speaks the OpenAI API (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`) so that agent frameworks and the `openai` package work unchanged, and
adds the cachetalk endpoints a broker uses to move KV caches between models
(`/v1/tokenize`, `/v1/tokenizer`, `/v1/kv/prefill`, `/v1/kv/generate`). The HTTP server
starts at once and loads the model in the background: /health and every model endpoint
return 503 until it is ready.

Example:
    $ cachetalk agent --model gemma3-270m --port 8001
    >>> from openai import OpenAI
    >>> client = OpenAI(base_url="http://127.0.0.1:8001/v1", api_key="none")
    >>> client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from cachetalk.server.agent_kv import kv_router
from cachetalk.server.agent_openai import openai_router
from cachetalk.server.errors import install_error_handlers
from cachetalk.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cachetalk.server.middleware import BodyLimitMiddleware, RequestLogMiddleware
from cachetalk.server.openai_api import ModelCard, ModelList
from cachetalk.server.runtime import DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH_TOKENS, ModelRuntime

if TYPE_CHECKING:
    from cachetalk.server.models import LoadedModel

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_MB = 512
# Seconds that a stopping agent lets running requests finish before it cancels them.
GRACEFUL_SHUTDOWN_S = 5


def create_app(model_spec: str, max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20, lm: LoadedModel | None = None,
               load: bool = True, threads: int | None = None,
               on_load_failure: Callable[[], None] | None = None, max_batch: int | None = None,
               max_batch_tokens: int | None = None) -> FastAPI:
    """Build the agent's ASGI app for `model_spec` (a short name, folder, GGUF file or hub id).

    With `lm` the app serves that already loaded model. Otherwise, when `load` is set, the
    app's startup begins loading the model in a background thread and calls
    `on_load_failure()` if that fails. `threads` sets PyTorch's CPU thread count, for
    the whole process, before loading. `max_batch` and `max_batch_tokens` cap the decode
    steps of concurrent requests that run as one batch (rows and padded cache positions).
    """
    runtime = ModelRuntime(model_spec, lm, threads, max_batch, max_batch_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if runtime.lm is None and load:
            runtime.start_loading(on_load_failure)
        yield

    app = FastAPI(title="cachetalk agent", lifespan=lifespan)
    app.state.runtime = runtime
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(RequestLogMiddleware, on_finish=runtime.metrics.count_request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if runtime.lm is None:
            status = "failed" if runtime.load_error else "loading"
            return JSONResponse({"status": status, "model": model_spec}, status_code=503)
        return JSONResponse({"status": "ok", "model": runtime.lm.name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        lm = runtime.require()
        card = ModelCard(id=lm.name, created=runtime.loaded_at, max_model_len=lm.context_length,
                         fingerprint=lm.fingerprint, num_layers=lm.num_layers, kv_heads=lm.num_kv_heads,
                         head_dim=lm.head_dim, layer_kinds=lm.layer_kinds,
                         dtype=str(lm.dtype).removeprefix("torch."))
        return ModelList(data=[card])

    app.include_router(openai_router(runtime))
    app.include_router(kv_router(runtime))
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model to serve: a short name (smollm2-135m, gemma3-270m), a folder, a GGUF file or a "
                             "hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port to bind (default 8001)")
    parser.add_argument("--max-body-mb", type=int, default=DEFAULT_MAX_BODY_MB,
                        help=f"largest accepted request body in MiB (default {DEFAULT_MAX_BODY_MB}); a 1,000-token "
                             "KV cache of the default models is 30 to 50 MiB in float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for model computation (default: PyTorch's choice, one per core); "
                             "lower it when several agents share a machine")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="most concurrent requests whose decode steps run as one batch "
                             f"(default {DEFAULT_MAX_BATCH}; 1 turns batching off)")
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                        help="cap on rows x longest cache in a decode batch, which bounds the padded copy each "
                             f"batched step makes (default {DEFAULT_MAX_BATCH_TOKENS})")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; exit with 1 when the model cannot be loaded."""
    if args.max_body_mb <= 0:
        logger.error("--max-body-mb must be positive, got %d", args.max_body_mb)
        return 2
    for option in ("threads", "max_batch", "max_batch_tokens"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            logger.error("--%s must be positive, got %d", option.replace("_", "-"), value)
            return 2
    server: uvicorn.Server | None = None
    failed = False

    def stop_on_failure() -> None:
        nonlocal failed
        failed = True
        server.should_exit = True

    app = create_app(args.model, max_body_bytes=args.max_body_mb << 20, threads=args.threads,
                     on_load_failure=stop_on_failure, max_batch=args.max_batch,
                     max_batch_tokens=args.max_batch_tokens)
    # log_config=None keeps the logging set up by the command line; the request log
    # middleware replaces uvicorn's access log.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    logger.info("starting agent for %s on http://%s:%d", args.model, args.host, args.port)
    server.run()
    return 1 if failed else 0
