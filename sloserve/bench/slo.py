"""Latency SLOs: parse `ttft=200ms,tpot=50ms,e2e=2s`, and judge a request against them."""
from __future__ import annotations

import re
from dataclasses import dataclass

_KEYS = {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s", "e2el": "e2e_s"}  # e2el: vLLM's name
_VALUE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$")


@dataclass(slots=True)
class SLO:
    """Upper bounds in seconds; None means "not constrained". A request meets
    the SLO when it succeeded and every given bound holds (<=, as vLLM's
    goodput). TPOT is undefined for a one-token reply, so it cannot violate
    the TPOT bound (vLLM counts it as 0 for goodput)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """`ttft=200ms,tpot=50ms,e2e=2s`; `:` works for `=`, and a bare number is milliseconds (vLLM's --goodput)."""
        slo = cls()
        for part in filter(None, re.split(r"[,\s]+", text.strip())):
            key, sep, value = part.replace(":", "=").partition("=")
            m = _VALUE.match(value)
            if not sep or key.lower() not in _KEYS or m is None:
                raise ValueError(f"bad SLO term {part!r}; expected e.g. ttft=200ms,tpot=50ms,e2e=2s")
            seconds = float(m.group(1)) / (1.0 if m.group(2) == "s" else 1000.0)
            setattr(slo, _KEYS[key.lower()], seconds)
        if slo.is_empty():
            raise ValueError("empty SLO")
        return slo

    def is_empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None

    def met(self, ttft_s: float, tpot_s: float | None, e2e_s: float) -> bool:
        return (
            (self.ttft_s is None or ttft_s <= self.ttft_s)
            and (self.tpot_s is None or tpot_s is None or tpot_s <= self.tpot_s)
            and (self.e2e_s is None or e2e_s <= self.e2e_s)
        )

    def describe(self) -> str:
        terms = [(k, getattr(self, f)) for k, f in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s"))]
        return ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in terms if v is not None)

    def to_dict(self) -> dict:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}

    @classmethod
    def from_dict(cls, d: dict | None) -> SLO | None:
        return None if d is None else cls(d.get("ttft_s"), d.get("tpot_s"), d.get("e2e_s"))
