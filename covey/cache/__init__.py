"""KV reuse: the prefix cache as a block trie, and the chunk KV store in host and disk tiers."""
