"""ShareGPT-format conversations as prompts, filtered and sampled the way vLLM's sharegpt dataset is."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from sloserve.bench.tokens import Tokenizer, count_tokens

# vLLM's filter: drop tiny turns (they measure nothing) and long ones (they
# would overflow small context windows); applied unless output_len is fixed.
MIN_LEN, MAX_PROMPT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048


def bundled_path(name: str) -> str:
    """Path of a sample file shipped in sloserve/bench/data (so the bench runs offline)."""
    return str(resources.files("sloserve.bench").joinpath("data", name))


@dataclass(slots=True)
class ShareGPTSource:
    """First human turn is the prompt; the reply's length (or `output_len`) is max_tokens.

    Without a tokenizer, lengths are estimated as ceil(chars / 4).
    """

    path: str = ""
    output_len: int | None = None

    def resolved_path(self) -> str:
        return self.path or bundled_path("sharegpt_sample.json")

    def sample(self, n: int, rng: np.random.Generator, tokenizer: Tokenizer | None) -> list[tuple[str, int, int]]:
        pairs = self._valid_pairs(tokenizer)
        if not pairs:
            raise ValueError(f"no usable conversations in {self.resolved_path()}")
        order = rng.permutation(len(pairs))
        # Fewer conversations than requests: cycle through the shuffled set
        # rather than fail, so a small sample file still drives a long run.
        return [pairs[order[i % len(pairs)]] for i in range(n)]

    def _valid_pairs(self, tokenizer: Tokenizer | None) -> list[tuple[str, int, int]]:
        with open(self.resolved_path(), encoding="utf-8") as f:
            data = json.load(f)
        out = []
        for conv in data:
            turns = conv.get("conversations") or []
            if len(turns) < 2:
                continue
            prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
            prompt_len = count_tokens(prompt, tokenizer)
            out_len = self.output_len if self.output_len is not None else count_tokens(reply, tokenizer)
            if self.output_len is None and not _keep(prompt_len, out_len):
                continue
            out.append((prompt, prompt_len, out_len))
        return out

    def to_dict(self) -> dict:
        return {"name": "sharegpt", "path": self.resolved_path(), "output_len": self.output_len}

    @classmethod
    def from_dict(cls, d: dict) -> ShareGPTSource:
        return cls(path=d["path"], output_len=d["output_len"])


def _keep(prompt_len: int, out_len: int) -> bool:
    if prompt_len < MIN_LEN or out_len < MIN_LEN:
        return False
    return prompt_len <= MAX_PROMPT_LEN and prompt_len + out_len <= MAX_TOTAL_LEN
