"""Client SDK and the KV cache wire format (no torch needed)."""
