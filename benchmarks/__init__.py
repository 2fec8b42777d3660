"""`cachetalk bench`: accuracy and latency of c2c, t2t and solo through the real servers."""
