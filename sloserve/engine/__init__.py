"""The engine's step loop: scheduler, KV-cache block manager, policies and the executor seam."""
