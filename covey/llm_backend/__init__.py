"""Our own LLM engine: model, paged KV pool, block manager, scheduler, sampler."""
