"""Client SDK of the cachetalk broker and the KV cache wire format (no torch needed).

Example:
    >>> from cachetalk.client import Client
    >>> with Client("http://127.0.0.1:8000") as client:
    ...     print(client.chat("Is a tomato a fruit?", model="smollm2-135m", sharers=["gemma3-270m"]).text)
"""

from cachetalk.client.errors import (AgentError, AgentTimeoutError, APIConnectionError, BadRequestError,
                                     CachetalkError, NotFoundError, ServiceUnavailableError)
from cachetalk.client.sdk import AsyncClient, Client, build_chat_body
from cachetalk.client.streaming import AsyncChatStream, ChatStream
from cachetalk.client.types import (AgentInfo, BridgeCard, CachetalkInfo, ChatChunk, ChatResponse, Health, Message,
                                    ModelInfo, Timings, Usage)

__all__ = [
    "AgentError", "AgentInfo", "AgentTimeoutError", "APIConnectionError", "AsyncChatStream", "AsyncClient",
    "BadRequestError", "BridgeCard", "CachetalkError", "CachetalkInfo", "ChatChunk", "ChatResponse", "ChatStream",
    "Client", "Health", "Message", "ModelInfo", "NotFoundError", "ServiceUnavailableError", "Timings", "Usage",
    "build_chat_body",
]
