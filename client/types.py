"""Typed responses of the cachetalk broker (pydantic, no torch).

Every model accepts fields it does not declare, so a newer broker does not break an
older client; undeclared fields are kept in `model_extra`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Mode = Literal["c2c", "t2t", "solo"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Timings(_Open):
    """Milliseconds spent per stage of one request; None for a stage the mode does not run.

    - tokenize_ms: applying the chat template and aligning the tokens (c2c); the first
      request also fetches and loads the agents' tokenizers here.
    - sharer_prefill_ms: sharers computing their prompt cache (c2c, summed over sharers),
      or their time to first token (t2t).
    - sharer_decode_ms: sharers writing their text message after the first token (t2t).
    - receiver_prefill_ms: the receiver computing its own prompt cache (c2c), or its time
      to first token (t2t, solo).
    - transfer_ms: HTTP time not spent computing on an agent (network, and the agents
      packing and unpacking the cache).
    - serialization_ms: the broker decoding and encoding KV caches, plus the receiver
      importing the fused cache.
    - bridge_ms: applying the bridges.
    - decode_ms: the receiver generating the answer.
    - total_ms: the whole request as the broker saw it.
    """

    tokenize_ms: float | None = None
    sharer_prefill_ms: float | None = None
    sharer_decode_ms: float | None = None
    receiver_prefill_ms: float | None = None
    transfer_ms: float | None = None
    serialization_ms: float | None = None
    bridge_ms: float | None = None
    decode_ms: float | None = None
    total_ms: float | None = None


class SharerNote(_Open):
    """A sharer's text message to the receiver in t2t mode."""

    sharer: str
    text: str


class CachetalkInfo(_Open):
    """Summary of how the broker served a request: the `cachetalk` object of every response.

    `bridge` has one entry per sharer in c2c mode: the name of the bridge applied, or
    None for a sharer that serves the receiver's own model (its cache passes as is).
    It is None in t2t and solo mode. `notes` holds, in t2t mode only, the text message
    each sharer wrote for the receiver.
    """

    mode: Mode
    sharers: list[str] = []
    bridge: list[str | None] | None = None
    timings: Timings = Timings()
    notes: list[SharerNote] | None = None


class Usage(_Open):
    """Token counts of the receiver's generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Message(_Open):
    """One chat message."""

    role: str
    content: str | None = None


class Choice(_Open):
    """One completion of a non-streamed response (the broker returns exactly one)."""

    index: int = 0
    message: Message
    finish_reason: str | None = None


class ChatResponse(_Open):
    """A chat completion, in the OpenAI shape plus the `cachetalk` object."""

    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    cachetalk: CachetalkInfo | None = None

    @property
    def text(self) -> str:
        """Content of the first choice ("" when empty)."""
        return (self.choices[0].message.content or "") if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        """Why generation stopped: "stop" or "length"."""
        return self.choices[0].finish_reason if self.choices else None


class Delta(_Open):
    """The new part of the message in one streamed chunk."""

    role: str | None = None
    content: str | None = None


class ChunkChoice(_Open):
    """One choice of a streamed chunk."""

    index: int = 0
    delta: Delta = Delta()
    finish_reason: str | None = None


class ChatChunk(_Open):
    """One server-sent event of a streamed chat completion.

    The last chunk before the stream ends carries `cachetalk` (and `usage` when the
    request asked for it with `stream_options={"include_usage": True}`).
    """

    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str
    choices: list[ChunkChoice] = []
    usage: Usage | None = None
    cachetalk: CachetalkInfo | None = None

    @property
    def text(self) -> str:
        """Content added by this chunk ("" when none)."""
        return (self.choices[0].delta.content or "") if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


class ModelInfo(_Open):
    """A receiver the broker routes to (an entry of `/v1/models`)."""

    id: str
    object: str = "model"
    owned_by: str = "cachetalk"
    created: int = 0


class AgentInfo(_Open):
    """An agent configured in the broker: its name (the model it serves), URL and state.

    `status` is "ok", "loading" or "unreachable". `model` holds the agent's `/v1/models`
    entry (fingerprint, layers, KV heads, head_dim, ...) once the broker has reached it.
    """

    name: str
    url: str
    status: str
    model: dict | None = None


class BridgeCard(_Open):
    """A bridge the broker can apply: the pair, the model fingerprints, its size and evaluation."""

    name: str
    sharer: str
    receiver: str
    sharer_fingerprint: str | None = None
    receiver_fingerprint: str | None = None
    parameters: int | None = None
    size_bytes: int | None = None
    self_bridge: bool = False
    eval: list[dict] | None = None  # per recorded evaluation: data, split, limit, overall accuracy per condition
    path: str | None = None


class AgentHealth(_Open):
    """State of one agent as seen from the broker."""

    url: str
    status: str
    detail: str | None = None


class Health(_Open):
    """`/health` of the broker: its own status and each agent's."""

    status: str  # the broker's own: "ok" while it runs, whatever its agents' state
    ready: bool | None = None  # every agent serves and every tokenizer is loaded
    tokenizers: str | None = None  # "loading" until the broker has every agent's tokenizer, then "ready"
    agents: dict[str, AgentHealth] = {}
