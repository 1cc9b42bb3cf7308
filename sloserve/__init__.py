"""sloserve: a latency-first LLM inference engine."""
from importlib.metadata import PackageNotFoundError, version

from sloserve.request import SLO, CompletionOutput, RequestOutput, SamplingParams, TextPrompt, TokensPrompt

try:
    __version__ = version("sloserve")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["LLM", "SLO", "CompletionOutput", "RequestOutput", "SamplingParams", "TextPrompt", "TokensPrompt", "__version__"]


def __getattr__(name: str):
    # Lazy: `LLM` pulls in PyTorch and the model, which clients such as the bench never need.
    if name == "LLM":
        from sloserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'sloserve' has no attribute {name!r}")
