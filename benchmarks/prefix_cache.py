"""Prefix caching on vs off on the real server under `sloserve bench`, and the simulator's prediction of each:
TTFT, throughput and hit rate per scenario."""

# Run: python benchmarks/prefix_cache.py [--rounds 3] [--requests 8] [--conversations 2] [--turns 6]
#      [--output-len 16] [--threads 1] [--out DIR] [--profile PROFILE.json]
#      or, for the max goodput rate of (a) and (b) against llama.cpp's llama-server (benchmarks/prefix_cache_vs_llama.py):
#      python benchmarks/prefix_cache.py --vs-llama-server [--rounds 1] [--slo-shared ...] [--slo-multi-turn ...]
# Two `sloserve serve` processes hold the same SmolLM2-135M-shaped random-weight model, one with
# --no-enable-prefix-caching; each round runs every scenario against both, alternating which goes first,
# so load from others on a shared machine falls on both alike. Scenarios (`sloserve bench`, one request
# at a time so TTFT is the server's own latency, not queueing):
#   (a) shared: a 1,000-token prefix every prompt shares (the system prompt) + a 50-token unique question;
#       each round draws a new prefix (--seed), and the bench's one warm-up request computes it once.
#   (b) multi-turn: the bundled conversations chained --turns exchanges deep (`--dataset-name multiturn`); each
#       turn resends the conversation so far (recorded replies), so it shares the previous turn's prompt.
#   (c) unique: 1,050 fresh tokens per prompt, nothing to share: the overhead of caching.
# The hit rate comes from the server's /metrics (prefix_cache_hits / prefix_cache_queries, in tokens).
# The prediction: the simulator (the same engine over a step-time model fitted by `sloserve profile` on this
# machine, profiled first unless --profile is given) replays each run's saved workload, its test request and
# warm-up included, with caching on or off like the server it predicts.

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from transformers import LlamaConfig

from sloserve.bench.endpoint import free_port, stop_servers, wait_until_healthy
from sloserve.bench.metrics import summarize
from sloserve.bench.results import BenchResults
from sloserve.bench.sharegpt import bundled_path
from sloserve.bench.tokens import HFTokenizer
from sloserve.bench.workload import Workload
from sloserve.sim.clock import VirtualClock
from sloserve.sim.profile import Profile, describe_machine
from sloserve.sim.simulate import EngineKnobs, build_sim_engine, simulate

sys.path.insert(0, str(Path(__file__).parent))
from sim_vs_real import SLOSERVE, SMOLLM2_135M  # noqa: E402

def scenarios(args) -> dict[str, list[str]]:
    """Each scenario's `sloserve bench` flags."""
    n = ["--num-prompts", str(args.requests)]
    turns = ["--multiturn-turns", str(args.turns), "--num-prompts", str(args.conversations * args.turns)]
    return {
        "a_shared_prefix": ["--random-prefix-len", "1000", "--random-input-len", "50", *n],
        "b_multi_turn": ["--dataset-name", "multiturn", *turns],
        "c_no_sharing": ["--random-input-len", "1050", *n],
    }

SYSTEMS = ("caching_on", "caching_off")
KNOBS = ["--load-format", "dummy", "--max-num-batched-tokens", "512"]
_WARMUP_BASE = 1_000_000  # simulated warm-up requests' indices, apart from the measured ones


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=8, help="measured requests of (a) and (c) per system and round")
    p.add_argument("--conversations", type=int, default=2, help="(b): conversations per system and round")
    p.add_argument("--turns", type=int, default=6, help="(b): exchanges per conversation")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each server")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, help="reuse this step-time profile instead of profiling first")
    vs = p.add_argument_group("--vs-llama-server: max goodput rate of (a) and (b), sloserve vs llama-server")
    vs.add_argument("--vs-llama-server", action="store_true")
    vs.add_argument("--slo-shared", default="ttft=2s,tpot=300ms", help="the SLO of (a), both servers")
    vs.add_argument("--slo-multi-turn", default="ttft=2s,tpot=300ms", help="the SLO of (b), both servers")
    vs.add_argument("--probe-requests", type=int, default=16, help="requests per sweep probe")
    vs.add_argument("--start-rate", type=float, default=0.5, help="first rate each sweep probes (req/s)")
    vs.add_argument("--max-probes", type=int, default=6)
    vs.add_argument("--parallel", type=int, default=8, help="llama-server's slots (-np)")
    vs.add_argument("--warmups", type=int, default=None, help="warm-ups sent at once before each sweep (default: "
                    "--parallel, so every llama-server slot holds (a)'s shared prefix, as sloserve's one cache does)")
    vs.add_argument("--start-round", type=int, default=0, help="first round's number (odd: llama-server goes first; "
                    "it also picks the prompts), to continue a run in another invocation")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="prefix_cache-"))
    model_dir = out / "smollm2-135m-dummy"
    LlamaConfig(**SMOLLM2_135M).save_pretrained(model_dir)
    save_conversation_tokenizer(model_dir, SMOLLM2_135M["vocab_size"])
    if args.vs_llama_server:
        from prefix_cache_vs_llama import compare

        print(f"machine: {describe_machine()}; load average {os.getloadavg()}")
        return compare(args, model_dir, out)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    print(f"machine: {describe_machine()}; {args.threads} torch thread(s) per server; load average {os.getloadavg()}")
    profile_path = args.profile or str(out / "profile.json")
    if args.profile is None:
        t = time.perf_counter()
        subprocess.run([*SLOSERVE, "profile", str(model_dir), *KNOBS, "--quick", "-o", profile_path], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        print(f"profiled in {time.perf_counter() - t:.0f} s (load average {os.getloadavg()[0]:.2f})")
    prof = Profile.load(profile_path)

    servers, bases = {}, {}
    try:
        for system in SYSTEMS:
            port = free_port()
            flag = "--enable-prefix-caching" if system == "caching_on" else "--no-enable-prefix-caching"
            servers[system] = subprocess.Popen(
                [*SLOSERVE, "serve", str(model_dir), *KNOBS, "--num-kv-blocks", str(prof.engine["num_kv_blocks"]),
                 flag, "--port", str(port), "--log-level", "warning"], env=env)
            bases[system] = f"http://127.0.0.1:{port}"
        for system in SYSTEMS:
            wait_until_healthy(bases[system], servers[system])
        runs: dict[tuple[str, str], list] = {}
        for r in range(args.rounds):
            for scenario, flags in scenarios(args).items():
                order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
                for system in order:
                    run = _bench(bases[system], model_dir, flags, args, seed=1000 * r + 17,
                                 result_dir=out / f"{scenario}-{system}-r{r}")
                    run |= _predict(prof, run["workload"], system == "caching_on", model_dir)
                    runs.setdefault((scenario, system), []).append(run)
                    print(f"  round {r} {scenario} {system}: TTFT p50 {run['ttft_p50'] * 1000:.0f} ms "
                          f"(simulated {run['sim_ttft_p50'] * 1000:.0f} ms), hit rate {run['hit_rate']:.1%} "
                          f"(simulated {run['sim_hit_rate']:.1%}), load {os.getloadavg()[0]:.2f}")
    finally:
        stop_servers(servers.values())
    table = _table(runs)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "machine": describe_machine(), "rows": table},
                                                 indent=2))
    _print(table, args)
    print(f"load average at the end {os.getloadavg()}; results in {out}")


def save_conversation_tokenizer(path: Path, vocab_size: int) -> None:
    """One id per whitespace-separated word: the bundled conversations' words from id 259 (so multi-turn text has
    distinct ids where the words differ, and none is one of the specials or byte tokens below 259 in the GGUF vocab
    benchmarks/peers.py writes, which llama-server computes the same ids with), plain "w<i>" words elsewhere; every
    id decodes to a word, so the server streams text for every token (the bench counts only chunks with text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with open(bundled_path("sharegpt_sample.json"), encoding="utf-8") as f:
        texts = [t["value"] for c in json.load(f) for t in c["conversations"]]
    words = sorted({w for text in texts for w in text.split()} | {"User:", "Assistant:"})
    first = 3 + 256  # peers.py's GGUF: <unk>, <s>, </s>, then the 256 byte tokens
    vocab = {f"w{i}": i for i in range(vocab_size) if not first <= i < first + len(words)}
    vocab |= {w: first + i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def _bench(base: str, model_dir: Path, flags: list[str], args, seed: int, result_dir: Path) -> dict:
    """One `sloserve bench` run; the hit rate is the server's counters' change across it."""
    before = _prefix_counters(base)
    subprocess.run([*SLOSERVE, "bench", "--base-url", base, "--model", model_dir.name, *flags,
                    "--tokenizer", str(model_dir), "--sharegpt-output-len", str(args.output_len),
                    "--random-output-len", str(args.output_len),
                    "--arrival", "synchronous", "--num-warmups", "1", "--seed", str(seed), "--temperature", "0",
                    "--ignore-eos", "--no-plots", "--result-dir", str(result_dir)],
                   check=True, stdout=subprocess.DEVNULL)
    after = _prefix_counters(base)
    queries, hits = after[0] - before[0], after[1] - before[1]
    results = BenchResults.load(str(result_dir / "results.json"))
    run = results.runs[0]
    s = summarize(run.records, run.duration_s, (50.0, 99.0))
    if s.failed:
        raise RuntimeError(f"{s.failed} requests failed in {result_dir}")
    return {"records": run.records, "duration_s": run.duration_s, "ttft_p50": s.ttft.percentiles[50.0],
            "hit_rate": hits / queries if queries else 0.0,
            "workload": Workload.from_dict(results.config["workload"])}


def _predict(prof: Profile, w: Workload, caching: bool, model_dir: Path) -> dict:
    """The simulator on the run's own workload: the bench's test request and warm-up first, as sent."""
    tok = HFTokenizer(str(model_dir))
    warmups = w.warmup_requests(2, tok)  # the untimed test request (max 4 tokens) and the one warm-up
    warmups[0].output_len = min(4, warmups[0].output_len)
    for i, spec in enumerate(warmups):
        spec.index = _WARMUP_BASE + i
    e = prof.engine
    knobs = EngineKnobs(e["max_num_batched_tokens"], e["max_num_seqs"], e["num_kv_blocks"], e["max_model_len"],
                        e["block_size"], e["vocab_size"], enable_prefix_caching=caching)
    clock = VirtualClock()
    engine = build_sim_engine(prof.step_model, knobs, "fcfs", clock)
    outcome = simulate(engine, clock, warmups + w.requests(tok), max_concurrency=w.max_concurrency)
    measured = [r for r in outcome.records if r.index < _WARMUP_BASE]
    s = summarize(measured, outcome.duration_s, (50.0, 99.0))
    stats = engine.block_manager.stats
    return {"sim_records": measured, "sim_ttft_p50": s.ttft.percentiles[50.0],
            "sim_hit_rate": stats.hits / stats.queries if stats.queries else 0.0}


def _prefix_counters(base: str) -> tuple[float, float]:
    """(queries, hits) in tokens from /metrics, under vLLM's names or sloserve's."""
    text = httpx.get(base + "/metrics", timeout=10).text
    values = []
    for name in ("prefix_cache_queries_total", "prefix_cache_hits_total"):
        m = re.search(rf"^(?:vllm|sloserve):{name}(?:\{{.*?\}})? (\S+)$", text, re.M)
        values.append(float(m.group(1)) if m else 0.0)
    return values[0], values[1]


def _table(runs: dict) -> list[dict]:
    rows = []
    for (scenario, system), rs in runs.items():
        records = [rec for r in rs for rec in r["records"]]
        s = summarize(records, sum(r["duration_s"] for r in rs), (50.0, 99.0))  # pooled over rounds
        per_round = [r["ttft_p50"] * 1000 for r in rs]
        sim = summarize([rec for r in rs for rec in r["sim_records"]], 1.0, (50.0, 99.0))
        rows.append({"sim_ttft_p50_ms": sim.ttft.percentiles[50.0] * 1000, "sim_ttft_p99_ms": sim.ttft.percentiles[99.0] * 1000,
                     "sim_hit_rate": statistics.mean(r["sim_hit_rate"] for r in rs),
                     "scenario": scenario, "system": system, "requests": len(records),
                     "ttft_p50_ms": s.ttft.percentiles[50.0] * 1000, "ttft_p99_ms": s.ttft.percentiles[99.0] * 1000,
                     "round_p50_min_ms": min(per_round), "round_p50_median_ms": statistics.median(per_round),
                     "output_tok_s": s.output_throughput, "req_s": s.request_throughput,
                     "hit_rate": statistics.mean(r["hit_rate"] for r in rs)})
    return rows


def _print(rows: list[dict], args) -> None:
    print(f"\nsynchronous requests, {args.requests} per system and round in (a) and (c), {args.conversations} "
          f"conversations of {args.turns} turns in (b), x {args.rounds} rounds, "
          f"{args.output_len} output tokens; TTFT pooled over rounds; rounds alternate which system goes first")
    print(f"{'scenario':<16} {'system':<12} {'TTFT p50':>9} {'p99':>8} {'round p50 min/med':>18} "
          f"{'out tok/s':>9} {'req/s':>6} {'hit rate':>8} | {'sim p50':>8} {'sim p99':>8} {'sim/real':>8} {'sim hit':>8}")
    by = {(r["scenario"], r["system"]): r for r in rows}
    for r in rows:
        print(f"{r['scenario']:<16} {r['system']:<12} {r['ttft_p50_ms']:8.0f}ms {r['ttft_p99_ms']:6.0f}ms "
              f"{r['round_p50_min_ms']:8.0f}/{r['round_p50_median_ms']:<6.0f}ms    {r['output_tok_s']:9.1f} "
              f"{r['req_s']:6.3f} {r['hit_rate']:8.1%} | {r['sim_ttft_p50_ms']:6.0f}ms {r['sim_ttft_p99_ms']:6.0f}ms "
              f"{r['sim_ttft_p50_ms'] / r['ttft_p50_ms']:8.2f} {r['sim_hit_rate']:8.1%}")
    for scenario in scenarios(args):
        on, off = by[(scenario, "caching_on")], by[(scenario, "caching_off")]
        print(f"{scenario}: TTFT p50 off/on = {off['ttft_p50_ms'] / on['ttft_p50_ms']:.2f}x, "
              f"throughput on/off = {on['output_tok_s'] / off['output_tok_s']:.3f}")
    print("targets: (a) TTFT p50 off/on >= 5x; (c) on within 3% of off (TTFT p50 on/off <= 1.03); "
          "simulated TTFT p50 within 15% of measured in (a) and (b) (sim/real in [0.85, 1.15])")


if __name__ == "__main__":
    main()
