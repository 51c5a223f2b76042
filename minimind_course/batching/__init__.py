"""The batching engine's parts, one role per file: sequence, kv_cache, scheduler, runner."""
