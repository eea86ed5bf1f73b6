"""KV reuse: the prefix cache as a block trie (and, later, the chunk KV store)."""
