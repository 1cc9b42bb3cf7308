"""Incremental detokenizing cost per token: tokenizers' DecodeStream (used) vs decode-and-diff (the fallback).

Both detokenize the same token stream (the bundled model's tokenizer over a long English text, or
--tokenizer DIR) and must produce the same text; rounds alternate between them so machine load hits
both alike. Prints min and median microseconds per token and the ratio.

    python benchmarks/detokenize_vs_decode.py [--tokenizer DIR] [--tokens 4000] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from transformers import AutoTokenizer

import sloserve
from sloserve.engine.detokenizer import IncrementalDetokenizer, StreamDetokenizer

TEXT = (
    "Latency is what a user feels: the time to the first token, and the time between the tokens after it. "
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do shake "
    "the darling buds of May, and summer's lease hath all too short a date. Numbers 12, 345 and 6789; café, "
    "naïve, 東京, emoji 🙂 and punctuation (\"quoted\", [bracketed], {braced})!\n"
)


def per_token_us(make, ids: list[int], prompt: list[int]) -> tuple[float, str]:
    detokenizer = make(prompt)
    start = time.perf_counter()
    text = "".join(detokenizer.add(t) for t in ids)
    return (time.perf_counter() - start) / len(ids) * 1e6, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(Path(sloserve.__file__).parent / "assets" / "demo-target"))
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = tokenizer.encode(TEXT * (args.tokens // 40 + 1), add_special_tokens=False)[: args.tokens]
    prompt, ids = ids[:8], ids[8:]
    systems = {
        "DecodeStream": lambda p: StreamDetokenizer(tokenizer._tokenizer, p, True),
        "decode-and-diff": lambda p: IncrementalDetokenizer(tokenizer, p, True),
    }
    times: dict[str, list[float]] = {name: [] for name in systems}
    texts = {}
    for _ in range(args.rounds):
        for name, make in systems.items():
            us, texts[name] = per_token_us(make, ids, prompt)
            times[name].append(us)
    if len(set(texts.values())) != 1:
        raise SystemExit("the two detokenizers disagree on the text")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; load {os.getloadavg()}")
    print(f"tokenizer: {args.tokenizer}; {len(ids)} tokens per round, {args.rounds} rounds, interleaved")
    print(f"{'system':>16} {'min us/token':>13} {'median us/token':>16}")
    for name, values in times.items():
        print(f"{name:>16} {min(values):13.2f} {statistics.median(values):16.2f}")
    fallback, stream = times["decode-and-diff"], times["DecodeStream"]
    print(f"decode-and-diff / DecodeStream: {min(fallback) / min(stream):.1f}x (min), "
          f"{statistics.median(fallback) / statistics.median(stream):.1f}x (median)")


if __name__ == "__main__":
    main()
