"""Multi-turn chat: each turn resends the conversation so far (what a prefix cache is for), from ShareGPT-format files."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from sloserve.bench.sharegpt import bundled_path
from sloserve.bench.tokens import Tokenizer, count_tokens

Message = dict[str, str]
Exchange = tuple[str, str]  # (user turn, recorded assistant reply)


def render_conversation(messages: list[Message]) -> str:
    """The conversation as one completions prompt, ending where the assistant speaks next."""
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


@dataclass(slots=True)
class MultiTurnSource:
    """Conversations of `turns` exchanges, replayed turn by turn.

    Turn j sends the user turns and *recorded* replies 1..j-1, then user turn j: the previous
    turn's prompt is a prefix of this one's, so a prefix cache serves it (the server's own reply
    is not fed back, so the workload is fixed before the run and the simulator sees the same one).
    A conversation's turns are consecutive requests; with `--arrival synchronous` each is sent
    after the one before it finished, as a user would. A file conversation's exchanges stay
    together, cut every `turns` exchanges; shorter ones (the bundled sample has one exchange each)
    are chained to fill `turns`.
    Chat endpoints get the messages; completions get them rendered as "User: ... Assistant:" text.
    max_tokens is the recorded reply's length, or `output_len`.
    """

    path: str = ""
    turns: int = 4
    output_len: int | None = None

    def __post_init__(self) -> None:
        if self.turns < 1:
            raise ValueError(f"turns per conversation must be >= 1, got {self.turns}")

    def resolved_path(self) -> str:
        return self.path or bundled_path("sharegpt_sample.json")

    def sample(self, n: int, rng: np.random.Generator,
               tokenizer: Tokenizer | None) -> list[tuple[str, int, int, list[Message]]]:
        """(rendered prompt, its tokens, max_tokens, messages) for n requests, conversation by conversation."""
        conversations = self._conversations()
        if not conversations:
            raise ValueError(f"no usable conversations in {self.resolved_path()}")
        order = rng.permutation(len(conversations))
        # Cycle through the shuffled set when it is smaller than the run, so a small file drives a long one.
        stream = (x for k in range(n) for x in conversations[order[k % len(order)]])
        out: list[tuple[str, int, int, list[Message]]] = []
        history: list[Message] = []
        while len(out) < n:
            if len(history) >= 2 * self.turns:
                history = []  # the next conversation starts
            user, reply = next(stream)
            messages = history + [{"role": "user", "content": user}]
            prompt = render_conversation(messages)
            max_tokens = self.output_len if self.output_len is not None else max(1, count_tokens(reply, tokenizer))
            out.append((prompt, count_tokens(prompt, tokenizer), max_tokens, messages))
            history = messages + [{"role": "assistant", "content": reply}]
        return out

    def _conversations(self) -> list[list[Exchange]]:
        with open(self.resolved_path(), encoding="utf-8") as f:
            data = json.load(f)
        out = []
        for conv in data:
            turns = [t.get("value", "") for t in conv.get("conversations") or []]
            exchanges = [(q, a) for q, a in zip(turns[0::2], turns[1::2]) if q and a]
            if exchanges:
                out.append(exchanges)
        return out

    def to_dict(self) -> dict:
        return {"name": "multiturn", "path": self.resolved_path(), "turns": self.turns, "output_len": self.output_len}

    @classmethod
    def from_dict(cls, d: dict) -> MultiTurnSource:
        return cls(path=d["path"], turns=d["turns"], output_len=d["output_len"])
