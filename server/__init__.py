"""Agent and broker servers, model loading and KV cache handling (needs torch)."""
