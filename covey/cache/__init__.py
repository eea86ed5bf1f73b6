"""KV reuse: the prefix radix tree (and, later, the chunk KV store)."""
