"""Raw per-request records: what was sent, when each token arrived, and how it ended."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """One request as observed; all times are seconds from the run's start.

    `token_times_s[i]` is when the i-th token-bearing chunk arrived and
    `chunk_tokens[i]` how many tokens it carried (None when the server did
    not say). A simulator writes one entry per token with a count of 1.
    """

    index: int
    arrival_s: float  # scheduled arrival
    send_s: float  # request issued (after waiting for a concurrency slot); TTFT and E2E start here
    prompt_len: int  # from the workload
    max_tokens: int
    token_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int | None] = field(default_factory=list)
    end_s: float | None = None  # response finished or failed
    wire_s: float | None = None  # request fully written to the socket (client overhead = wire_s - send_s)
    output_tokens: int = 0
    output_tokens_source: str = "chunks"  # "usage" | "tokenizer" | "chunks"
    prompt_tokens: int | None = None  # from the server's usage, when offered
    status: int | None = None  # HTTP status; None when no response came
    error_kind: str | None = None  # None, "http_<status>", "timeout", "connection", "stream_error", "protocol", "empty", "other"
    error: str | None = None
    finish_reason: str | None = None
    cached_tokens: int | None = None  # prompt tokens the server's prefix cache served (usage.prompt_tokens_details)

    @property
    def success(self) -> bool:
        return self.error_kind is None and bool(self.token_times_s)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["success"] = self.success  # redundant, for readers of the raw JSON
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
