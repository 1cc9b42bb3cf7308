"""sloserve: a latency-first LLM inference engine."""
from sloserve.request import SLO, RequestOutput, SamplingParams

__all__ = ["LLM", "SLO", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    # Lazy: `LLM` pulls in PyTorch and the model, which clients such as the bench never need.
    if name == "LLM":
        from sloserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'sloserve' has no attribute {name!r}")
