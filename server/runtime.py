"""The agent's model slot: background loading, the model lock, tokenization and decoding.

The model is loaded in a background thread so that the HTTP server responds to /health
(503) while it loads. Model calls take one lock per model, because a CPU model gains
nothing from running two forward passes at once. Prompts run one at a time; the decode
steps of concurrent requests go through a `StepBatcher`, which runs them as one batched
forward pass between prompts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request

from cachetalk.server.errors import APIError, bad_request, context_overflow, model_not_found
from cachetalk.server.metrics import ServerMetrics
from cachetalk.server.openai_api import ChatMessage, KVGenerateRequest, SamplingRequest

# torch and transformers are imported by the model-loader thread, not at import time,
# so that the HTTP server binds and responds to /health within a second of starting. The
# functions that need them run only once the model has loaded and import them inside.
if TYPE_CHECKING:
    from cachetalk.server.batching import StepBatcher
    from cachetalk.server.generate import SamplingParams, Step
    from cachetalk.server.models import LoadedModel

logger = logging.getLogger(__name__)

# Seconds between checks for a vanished client while no token arrives (long prefill).
DISCONNECT_POLL_S = 0.25

_END = object()

# The request bodies that carry sampling fields: chat and text completions, and /v1/kv/generate.
SamplingFields = SamplingRequest | KVGenerateRequest

# Decode batching (see batching.py): rows per batch, and rows x longest cache, which
# bounds the padded copy of the caches that each batched step makes.
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_BATCH_TOKENS = 8192


class ModelRuntime:
    """The state of an agent: one model behind a lock, loaded in the background."""

    def __init__(self, spec: str, lm: LoadedModel | None = None, threads: int | None = None,
                 max_batch: int | None = None, max_batch_tokens: int | None = None):
        self.spec = spec
        self.threads = threads
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.batcher: StepBatcher | None = None
        self.lm = lm
        self.load_error: str | None = None
        self.loaded_at = int(time.time()) if lm is not None else None
        self.lock = threading.Lock()
        self.metrics = ServerMetrics(lm.name if lm is not None else spec)
        if lm is not None:
            self._make_batcher(lm)

    def start_loading(self, on_failure: Callable[[], None] | None = None) -> threading.Thread:
        thread = threading.Thread(target=self._load, args=(on_failure,), name="model-loader", daemon=True)
        thread.start()
        return thread

    def _load(self, on_failure: Callable[[], None] | None) -> None:
        started = time.perf_counter()
        logger.info("loading model %s", self.spec)
        try:
            import torch

            from cachetalk.server.kv import prefill
            from cachetalk.server.models import load_model

            if self.threads is not None:
                torch.set_num_threads(self.threads)
            lm = load_model(self.spec)
            with self.lock:
                prefill(lm, [lm.eos_token_ids[0] if lm.eos_token_ids else 0])  # warm-up: first call is slow
        except Exception as exc:
            logger.error("loading model %s failed", self.spec, exc_info=True)
            self.load_error = f"{type(exc).__name__}: {exc}"
            if on_failure is not None:
                on_failure()
            return
        self.metrics.model = lm.name
        self._make_batcher(lm)
        self.loaded_at = int(time.time())
        self.lm = lm
        logger.info("model %s ready in %.1f s (context length %d)", lm.name, time.perf_counter() - started,
                    lm.context_length)

    def _make_batcher(self, lm: LoadedModel) -> None:
        from cachetalk.server.batching import StepBatcher

        sizes = self.metrics.decode_batch_size.labels(lm.name)
        self.batcher = StepBatcher(lm, self.lock, self.max_batch or DEFAULT_MAX_BATCH,
                                   self.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS, observe=sizes.observe)

    def require(self, requested: str | None = None) -> LoadedModel:
        """Return the loaded model, or raise 503 while loading and 404 for another model's name."""
        lm = self.lm
        if lm is None:
            if self.load_error is not None:
                raise APIError(503, f"Model {self.spec} failed to load ({self.load_error}); see the server log.",
                               code="model_load_failed")
            raise APIError(503, f"Model {self.spec} is still loading; retry when GET /health returns 200.",
                           code="model_loading")
        if requested is not None and requested != lm.name:
            raise model_not_found(requested, lm.name)
        return lm


def encode_messages(lm: LoadedModel, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    """Tokenize a chat rendered with the model's chat template, which adds BOS itself."""
    turns = []
    for index, message in enumerate(messages):
        try:
            content = message.text()
        except ValueError as exc:
            raise bad_request(str(exc), param=f"messages.{index}.content") from None
        role = "system" if message.role == "developer" else message.role
        turns.append({"role": role, "content": content})

    if lm.tokenizer.chat_template is None:
        raise bad_request(f"Model {lm.name} has no chat template; use /v1/completions with a prompt.",
                          param="messages")
    try:
        text = lm.tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # jinja2 raises TemplateError for conversations a template rejects
        raise bad_request(f"The chat template of {lm.name} rejected the messages: {exc}", param="messages") from None
    return list(lm.tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(lm: LoadedModel, prompt: str | list[int] | list[str]) -> list[int]:
    """Tokenize a text prompt with the tokenizer's special tokens (such as BOS), or check given token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(lm.tokenizer.encode(prompt, add_special_tokens=True))
    else:
        ids = list(prompt)
        check_token_ids(lm, ids, "prompt")
    if not ids:
        raise bad_request("The prompt is empty; send at least one token.", param="prompt")
    return ids


def check_token_ids(lm: LoadedModel, token_ids: list[int], param: str) -> None:
    vocab = lm.config.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"Token id {bad[0]} is outside the vocabulary of {lm.name} (0 to {vocab - 1}).",
                          param=param)


def sampling_params(lm: LoadedModel, prompt_tokens: int, body: SamplingFields, max_tokens: int | None,
                    where: str) -> SamplingParams:
    """Build sampling settings from a request body with OpenAI's defaults, or raise the context-overflow error.

    Without `max_tokens` the completion may fill the rest of the context.
    """
    from cachetalk.server.generate import SamplingParams

    limit = lm.context_length
    completion = max_tokens if max_tokens is not None else max(limit - prompt_tokens, 1)
    if prompt_tokens + completion > limit:
        raise context_overflow(limit, prompt_tokens, completion, where)
    return SamplingParams(max_tokens=completion, temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=body.stop_list(),
                          ignore_eos=body.ignore_eos, frequency_penalty=body.frequency_penalty,
                          presence_penalty=body.presence_penalty)


class DecodeStream:
    """Runs `generate.decode` in a thread and hands its steps to the event loop.

    `cache` is an imported DynamicCache to continue from, or None for an empty one.
    Iterate `steps()`. When the client disconnects, or the iteration is closed early, the
    cancel event stops the decoding thread before its next token. Token counts, timings and
    the outcome are kept on the object and recorded in the metrics and the request log.
    """

    def __init__(self, runtime: ModelRuntime, request: Request, cache, token_ids: list[int],
                 params: SamplingParams, prompt_tokens: int):
        self.runtime = runtime
        self.request = request
        self.cache = cache
        self.token_ids = token_ids
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.cancel = threading.Event()
        self.started = getattr(request.state, "started", time.perf_counter())
        self.decode_started = time.perf_counter()
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.generated: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.failed = False

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    def timings_ms(self) -> dict[str, float]:
        """Milliseconds to the first token (prefill of the remaining prompt) and after it (decode)."""
        first = self.first_token_at or time.perf_counter()
        end = self.ended_at or time.perf_counter()
        return {"prefill_ms": round((first - self.decode_started) * 1000, 1),
                "decode_ms": round((end - first) * 1000, 1)}

    async def steps(self) -> AsyncIterator[Step]:
        from cachetalk.server.generate import Cancelled, decode

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop closed during shutdown
                pass

        running = self.runtime.metrics.running.labels(self.runtime.metrics.model)

        def produce() -> None:
            running.inc()
            try:
                for step in decode(self.runtime.lm, self.cache, self.token_ids, self.params, self.runtime.lock,
                                   self.cancel, self.runtime.batcher):
                    post(step)
            except Cancelled:
                pass
            except Exception as exc:
                post(exc)
            finally:
                running.dec()
            post(_END)

        self.decode_started = time.perf_counter()
        thread = threading.Thread(target=produce, name=f"decode-{self.request.state.request_id}", daemon=True)
        thread.start()
        try:
            while True:
                item = await self._next_item(queue)
                if item is _END:
                    return
                if isinstance(item, Exception):
                    self.failed = True
                    raise item
                self._account(item)
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel.set()
            self._record()

    async def _next_item(self, queue: asyncio.Queue):
        """Wait for the next step, checking for a vanished client before each one and while waiting."""
        while True:
            if await self.request.is_disconnected():
                self.cancel.set()
                return _END
            try:
                return await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                continue

    def _account(self, step: Step) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        if step.token_id is not None:
            self.generated.append(step.token_id)
        self.text += step.text
        if step.finish_reason is not None:
            self.finish_reason = step.finish_reason
            self.ended_at = now

    def _record(self) -> None:
        details = self.request.state.log_details
        end = self.ended_at or time.perf_counter()
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        outcome = self.finish_reason or ("error" if self.failed else "cancelled")
        details.update(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                       ttft_ms=f"{ttft * 1000:.1f}" if ttft is not None else "-", finish=outcome)
        if outcome == "error":
            return  # the exception is logged where it is handled
        if outcome == "cancelled":
            logger.info("request %s cancelled after %d tokens: the client disconnected or the stream was closed",
                        self.request.state.request_id, self.completion_tokens)
            return
        self.runtime.metrics.record_generation(self.prompt_tokens, self.completion_tokens, self.finish_reason,
                                               ttft, end - self.started)
