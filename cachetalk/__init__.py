"""cachetalk: language-model agents that exchange KV caches instead of text."""

__version__ = "0.1.0"
