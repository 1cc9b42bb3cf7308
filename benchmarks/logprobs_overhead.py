"""What logprobs cost: a decode step's time with no request asking, one asking, all asking; a prefill with prompt logprobs.

One engine over the bundled model (or --model DIR). Each round runs every variant on fresh requests,
in turn, so machine load hits them alike; prints min and median milliseconds per decode step (and per
prefill) and each variant's ratio to the peer measured in the same run: the same batch without logprobs.
On a shared machine the step times are noisy, so it also times the added work alone (scoring a
batch's logits rows and building its Logprob dicts), the best of many repetitions.

    python benchmarks/logprobs_overhead.py [--model DIR] [--batch 8] [--steps 16] [--rounds 5] [--top 5]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import sloserve
from sloserve import LLM, SamplingParams
from sloserve.model.logprobs import position_logprobs
from sloserve.request import Request


def decode_ms(llm: LLM, ids, prompts: list[list[int]], params: list[SamplingParams], steps: int) -> float:
    """Median step time of `steps` decode steps of the batch (its prefill is not timed)."""
    engine = llm.engine
    names = [str(next(ids)) for _ in prompts]
    for name, prompt, p in zip(names, prompts, params):
        engine.add_request(name, prompt, p)
    while any(engine.requests[n].num_computed_tokens < engine.requests[n].num_tokens - 1 for n in names):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for name in names:
        engine.abort_request(name)
    return statistics.median(times) * 1e3


def prefill_ms(llm: LLM, ids, prompt: list[int], p: SamplingParams) -> float:
    engine = llm.engine
    name = str(next(ids))
    request = engine.add_request(name, prompt, p)
    start = time.perf_counter()
    while not request.output_token_ids:
        engine.step()
    elapsed = time.perf_counter() - start
    engine.abort_request(name)
    return elapsed * 1e3


def added_work_ms(llm: LLM, batch: int, top: int, reps: int = 200) -> float:
    """The work logprobs add to one decode step of `batch` asking requests: best of `reps`."""
    logits = torch.randn(batch, llm.engine.vocab_size)
    chosen = logits.argmax(-1).tolist()
    params = SamplingParams(max_tokens=reps + 1, logprobs=top)
    requests = [Request(str(i), [1], params, 0.0) for i in range(batch)]
    for r in requests:
        llm.engine.logprobs.start(r)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for r, p in zip(requests, position_logprobs(logits, chosen, [top] * batch)):
            r.logprobs.append(llm.engine.logprobs._dict(p))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(sloserve.__file__).parent / "assets" / "demo-target"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=256)
    args = parser.parse_args()

    # No prefix caching: every round's prompts are computed, not found in the cache.
    llm = LLM(args.model, dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=1024)
    vocab = llm.engine.vocab_size
    ids = itertools.count()
    plain = SamplingParams(max_tokens=args.steps + 4, temperature=0, ignore_eos=True)
    asking = SamplingParams(max_tokens=args.steps + 4, temperature=0, ignore_eos=True, logprobs=args.top)
    decode_variants = {
        "no logprobs": [plain] * args.batch,
        "1 asks logprobs": [asking] + [plain] * (args.batch - 1),
        "all ask logprobs": [asking] * args.batch,
    }
    prefill_variants = {
        "no prompt logprobs": SamplingParams(max_tokens=1, temperature=0),
        "prompt logprobs": SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=args.top),
    }
    results: dict[str, list[float]] = {name: [] for name in [*decode_variants, *prefill_variants]}
    for r in range(args.rounds):
        prompts = [[(7 * r + 13 * i + j) % (vocab - 2) + 2 for j in range(16)] for i in range(args.batch)]
        for name, params in decode_variants.items():
            results[name].append(decode_ms(llm, ids, prompts, params, args.steps))
        long_prompt = [(31 * r + j) % (vocab - 2) + 2 for j in range(args.prompt_len)]
        for name, p in prefill_variants.items():
            results[name].append(prefill_ms(llm, ids, long_prompt, p))

    added = added_work_ms(llm, args.batch, args.top)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load[0]:.2f}")
    print(f"model: {args.model} (vocab {vocab}), float32; batch {args.batch}, top {args.top}, "
          f"{args.steps} decode steps x {args.rounds} rounds; prefill of {args.prompt_len} tokens")
    print(f"{'variant':<22}{'min ms':>10}{'median ms':>12}{'ratio (min)':>13}{'ratio (median)':>16}")
    for group, peer in ((decode_variants, "no logprobs"), (prefill_variants, "no prompt logprobs")):
        base_min, base_median = min(results[peer]), statistics.median(results[peer])
        for name in group:
            values = results[name]
            print(f"{name:<22}{min(values):>10.2f}{statistics.median(values):>12.2f}"
                  f"{min(values) / base_min:>13.3f}{statistics.median(values) / base_median:>16.3f}")
    print(f"added work of one decode step, all {args.batch} asking top {args.top}: {added:.3f} ms "
          f"({added / min(results['no logprobs']):.1%} of the fastest plain step)")


if __name__ == "__main__":
    main()
