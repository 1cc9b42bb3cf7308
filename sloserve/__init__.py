"""sloserve: a latency-first LLM inference engine."""
