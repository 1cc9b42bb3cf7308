"""Synthetic prompts of exact lengths: random token ids (vLLM's "random" dataset) or random words."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sloserve.bench.lengths import LengthDist
from sloserve.bench.tokens import Tokenizer

PROMPT_FORMATS = ("ids", "words")

# Short common English words: most BPE tokenizers encode each, with its leading
# space, as one token, so a prompt of k words costs about k tokens.
_WORDS = tuple(
    """the of and to in is it you that he was for on are with as his they be at one have this
    from or had by word but what some we can out other were all there when up use your how said
    an each she which do their time if will way about many then them write would like so these
    her long make thing see him two has look more day could go come did number sound no most
    people my over know water than call first who may down side been now find any new work part
    take get place made live where after back little only round man year came show every good me
    give our under name very through just form great think say help low line differ turn cause
    much mean before move right boy old too same tell does set three want air well also play small
    end put home read hand port large spell add even land here must big high such follow act why
    ask men change went light kind off need house picture try us again animal point mother world
    near build self earth father head stand own page should country found answer school grow study
    still learn plant cover food sun four between state keep eye never last let thought city tree
    cross farm hard start might story saw far sea draw left late run while press close night real
    life few north open seem together next white children begin got walk example ease paper group
    always music those both mark often letter until mile river car feet care second book carry took
    science eat room friend began idea fish mountain stop once base hear horse cut sure watch color
    face wood main enough plain girl usual young ready above ever red list though feel talk bird
    soon body dog family direct pose leave song measure door product black short numeral class wind
    question happen complete ship area half rock order fire south problem piece told knew pass since
    top whole king space heard best hour better true during hundred five remember step early hold
    west ground interest reach fast verb sing listen six table travel less morning ten simple several""".split()
)


def text_of_length(ids: list[int], target: int, tokenizer: Tokenizer, max_rounds: int = 10) -> tuple[str, int]:
    """Text near `ids` that encodes to exactly `target` tokens (its length, if no round lands there)."""
    filler = list(ids) or [tokenizer.vocab_size // 2]
    for _ in range(max_rounds):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text)
        if len(ids) == target:
            return text, target
        # Too long: cut; too short: top up with more of the original ids.
        ids = ids[:target] if len(ids) > target else ids + (filler * target)[: target - len(ids)]
    return text, len(tokenizer.encode(text))


@dataclass(slots=True)
class SyntheticSource:
    """Random prompts: `prefix_len` shared tokens, then `input` fresh tokens; `output` tokens asked.

    prompt_format "ids" sends token ids (the completions API takes `prompt` as
    a list of ints), drawn from [vocab_size // 10, vocab_size) to keep clear of
    the low ids where tokenizers keep special and byte tokens. With a tokenizer
    the prompt is sent as text of exactly the asked length: decoding random ids
    and re-encoding the text rarely round-trips, so the ids are re-encoded,
    cut or topped up until the text encodes to that many tokens (as vLLM's
    random dataset does). "words" sends random common words, needed for chat
    endpoints when there is no tokenizer.
    """

    input: LengthDist = field(default_factory=lambda: LengthDist(1024))
    output: LengthDist = field(default_factory=lambda: LengthDist(128))
    prefix_len: int = 0
    vocab_size: int = 32000
    prompt_format: str = "ids"

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.vocab_size < 2:
            raise ValueError("vocab_size must be >= 2")

    def sample(
        self, n: int, rng: np.random.Generator, prefix_rng: np.random.Generator, tokenizer: Tokenizer | None
    ) -> list[tuple[str | list[int], int, int]]:
        """(prompt, prompt_len, output_len) for n requests; the prefix comes from its own stream."""
        in_lens = self.input.sample(n, rng)
        out_lens = self.output.sample(n, rng)
        prefix = self._pieces(self.prefix_len, prefix_rng)
        out = []
        for in_len, out_len in zip(in_lens, out_lens):
            prompt, prompt_len = self._finish(prefix + self._pieces(in_len, rng), tokenizer)
            out.append((prompt, prompt_len, out_len))
        return out

    def prompt_of_len(self, length: int, rng: np.random.Generator, tokenizer: Tokenizer | None):
        """One prompt of about `length` tokens (traces that give only a length)."""
        return self._finish(self._pieces(length, rng), tokenizer)

    def _pieces(self, k: int, rng: np.random.Generator) -> list:
        if self.prompt_format == "words":
            return [_WORDS[i] for i in rng.integers(0, len(_WORDS), size=k)]
        return [int(i) for i in rng.integers(self.vocab_size // 10, self.vocab_size, size=k)]

    def _finish(self, pieces: list, tokenizer: Tokenizer | None) -> tuple[str | list[int], int]:
        if tokenizer is not None:
            ids = tokenizer.encode(" ".join(pieces)) if self.prompt_format == "words" else pieces
            return text_of_length(ids, len(pieces), tokenizer)
        if self.prompt_format == "words":
            return " ".join(pieces), len(pieces)
        return pieces, len(pieces)

    def to_dict(self) -> dict:
        return {
            "name": "random",
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "prefix_len": self.prefix_len,
            "vocab_size": self.vocab_size,
            "prompt_format": self.prompt_format,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticSource:
        return cls(
            input=LengthDist.from_dict(d["input"]),
            output=LengthDist.from_dict(d["output"]),
            prefix_len=d["prefix_len"],
            vocab_size=d["vocab_size"],
            prompt_format=d["prompt_format"],
        )
