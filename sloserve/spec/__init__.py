"""Speculative decoding: proposers (n-gram, draft model), the verifier, adaptive speculation length."""
