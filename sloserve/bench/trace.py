"""JSONL request traces for replay: arrival time, prompt or prompt length, output length per line."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from sloserve.bench.lengths import LengthDist
from sloserve.bench.sharegpt import bundled_path
from sloserve.bench.synthetic import SyntheticSource
from sloserve.bench.tokens import Tokenizer, count_tokens


@dataclass(slots=True)
class TraceEntry:
    arrival_s: float
    prompt: str | list[int] | None
    prompt_len: int
    output_len: int


def parse_trace_line(obj: dict) -> TraceEntry:
    """One line: {"arrival_s": 0.5, "prompt": "..." | [ids] , "prompt_len": 812, "output_len": 64}.

    Mooncake-style names are accepted too: "timestamp" (milliseconds),
    "input_length", "output_length". A line needs a prompt or a prompt length.
    """
    if "arrival_s" in obj:
        arrival = float(obj["arrival_s"])
    elif "timestamp" in obj:
        arrival = float(obj["timestamp"]) / 1000.0
    else:
        raise ValueError(f"trace line has no arrival_s/timestamp: {obj}")
    prompt = obj.get("prompt")
    prompt_len = obj.get("prompt_len", obj.get("input_length"))
    output_len = obj.get("output_len", obj.get("output_length"))
    if output_len is None:
        raise ValueError(f"trace line has no output_len: {obj}")
    if prompt is None and prompt_len is None:
        raise ValueError(f"trace line has neither prompt nor prompt_len: {obj}")
    return TraceEntry(arrival, prompt, int(prompt_len) if prompt_len is not None else -1, int(output_len))


@dataclass(slots=True)
class TraceSource:
    """Replays a JSONL trace; lines with only a length get a synthetic prompt of that length."""

    path: str = ""
    vocab_size: int = 32000
    prompt_format: str = "ids"

    def resolved_path(self) -> str:
        return self.path or bundled_path("trace_sample.jsonl")

    def entries(self) -> list[TraceEntry]:
        with open(self.resolved_path(), encoding="utf-8") as f:
            entries = [parse_trace_line(json.loads(line)) for line in f if line.strip()]
        return sorted(entries, key=lambda e: e.arrival_s)

    def sample(
        self, n: int, rng: np.random.Generator, tokenizer: Tokenizer | None
    ) -> tuple[list[tuple[str | list[int], int, int]], list[float]]:
        """(prompt, prompt_len, output_len) for the first n lines, and their arrival offsets."""
        entries = self.entries()[:n]
        filler = SyntheticSource(LengthDist(1), LengthDist(1), 0, self.vocab_size, self.prompt_format)
        out = []
        for e in entries:
            if e.prompt is None:
                prompt, prompt_len = filler.prompt_of_len(e.prompt_len, rng, tokenizer)
            elif isinstance(e.prompt, list):
                prompt, prompt_len = e.prompt, len(e.prompt)
            else:
                prompt = e.prompt
                prompt_len = e.prompt_len if e.prompt_len >= 0 else count_tokens(e.prompt, tokenizer)
            out.append((prompt, prompt_len, e.output_len))
        return out, [e.arrival_s for e in entries]

    def to_dict(self) -> dict:
        return {
            "name": "trace",
            "path": self.resolved_path(),
            "vocab_size": self.vocab_size,
            "prompt_format": self.prompt_format,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TraceSource:
        return cls(path=d["path"], vocab_size=d["vocab_size"], prompt_format=d["prompt_format"])
