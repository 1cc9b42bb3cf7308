"""Max goodput rate under one SLO, sloserve (prefix caching on) against llama.cpp's llama-server (prompt cache on),
on the shared-prefix and multi-turn workloads of benchmarks/prefix_cache.py; run by `prefix_cache.py --vs-llama-server`."""

# Both servers hold the same SmolLM2-135M-shaped model in fp32, one thread each: sloserve with --load-format dummy,
# llama-server on the GGUF benchmarks/peers.py writes (same shapes, its own N(0, 0.02) draws: speed, not text, is
# compared). Their tokenizers differ (the GGUF's is synthetic), so every prompt goes out as token ids, the same ids
# to both: (a) random ids, (b) the conversations through prefix_cache.py's word tokenizer (`--tokenize-prompt`).
# Output length is fixed: ignore_eos, max_tokens = --output-len, checked in each reply's usage.
# `sloserve bench --sweep` finds each max goodput rate (highest Poisson rate with SLO attainment >= 90%); every
# probe draws fresh prompts, the workload's shared prefix (a) stays shared across probes, and the warm-ups before
# the first probe (one per llama-server slot, sent at once) compute it on both servers. Rounds alternate which
# server is swept first.

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sloserve.bench.endpoint import free_port, stop_servers, wait_until_healthy
from sloserve.bench.metrics import summarize
from sloserve.bench.results import BenchResults
from sloserve.bench.slo import SLO

sys.path.insert(0, str(Path(__file__).parent))
import llama_server  # noqa: E402
from peers import write_gguf  # noqa: E402
from sim_vs_real import SLOSERVE, SMOLLM2_135M  # noqa: E402

SYSTEMS = ("sloserve", "llama-server")
SLOSERVE_KNOBS = ["--load-format", "dummy", "--max-num-batched-tokens", "512", "--enable-prefix-caching"]


def workloads(args, model_dir: Path) -> dict[str, list[str]]:
    """Each scenario's `sloserve bench` flags: prompts go out as ids, (a) drawn at random (no tokenizer, so no
    text round trip), (b) the word tokenizer's ids of each rendered turn."""
    vocab = ["--random-vocab-size", str(SMOLLM2_135M["vocab_size"])]  # ids in [vocab/10, vocab): plain GGUF tokens
    return {
        "a_shared_prefix": ["--random-prefix-len", "1000", "--random-input-len", "50", *vocab,
                            "--random-output-len", str(args.output_len), "--num-prompts", str(args.probe_requests)],
        "b_multi_turn": ["--dataset-name", "multiturn", "--multiturn-turns", str(args.turns), "--tokenize-prompt",
                         "--tokenizer", str(model_dir), "--sharegpt-output-len", str(args.output_len), "--num-prompts", str(args.probe_requests)],
    }


def compare(args, model_dir: Path, out: Path) -> None:
    """Start both servers, sweep each scenario on each, print the table."""
    binary, build_s = llama_server.build()
    gguf = out / "smollm2-135m-f32.gguf"
    write_gguf(SMOLLM2_135M, str(gguf), "float32")
    opts = llama_server.LlamaServerOptions(threads=args.threads, parallel=args.parallel,
                                           ctx_per_slot=SMOLLM2_135M["max_position_embeddings"])
    slos = {"a_shared_prefix": args.slo_shared, "b_multi_turn": args.slo_multi_turn}
    print(f"llama-server: {llama_server.version_of(binary)}; "
          f"{'built in %.0f s' % build_s if build_s else 'reused build'}; flags: {' '.join(opts.flags())}")
    print(f"sloserve: {' '.join(SLOSERVE_KNOBS)}, OMP_NUM_THREADS={args.threads}; SLOs: {slos}")
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    ports = {s: free_port() for s in SYSTEMS}
    procs = {
        "sloserve": subprocess.Popen([*SLOSERVE, "serve", str(model_dir), *SLOSERVE_KNOBS, "--port",
                                      str(ports["sloserve"]), "--log-level", "warning"], env=env),
        "llama-server": subprocess.Popen(llama_server.command(binary, gguf, ports["llama-server"], opts),
                                         stdout=subprocess.DEVNULL, stderr=open(out / "llama-server.log", "w")),
    }
    bases = {s: f"http://127.0.0.1:{p}" for s, p in ports.items()}
    sweeps: dict[tuple[str, str], list[dict]] = {}
    try:
        for s in SYSTEMS:
            wait_until_healthy(bases[s], procs[s], timeout_s=300)
        for r in range(args.start_round, args.start_round + args.rounds):
            for scenario, flags in workloads(args, model_dir).items():
                for system in (SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]):
                    result = _sweep(bases[system], model_dir, flags, slos[scenario], args, seed=1000 * r + 29,
                                    result_dir=out / f"{scenario}-{system}-r{r}")
                    sweeps.setdefault((scenario, system), []).append(result)
                    print(f"  round {r} {scenario} {system}: max goodput rate {result['max_rate']} req/s "
                          f"(lowest rate missing: {result['upper_rate']}), load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        stop_servers(procs.values())
    rows = _rows(sweeps)
    (out / "vs_llama_server.json").write_text(json.dumps(
        {"args": vars(args), "llama_server": {"version": llama_server.version_of(binary), "flags": opts.flags(),
                                              "build_s": build_s}, "slos": slos, "rows": rows}, indent=2))
    _print(rows, args, slos)


def _sweep(base: str, model_dir: Path, flags: list[str], slo: str, args, seed: int, result_dir: Path) -> dict:
    result_dir.mkdir(parents=True, exist_ok=True)
    with open(result_dir / "bench.log", "w") as log:
        subprocess.run([*SLOSERVE, "bench", "--base-url", base, "--model", model_dir.name, *flags, "--slo", slo,
                        "--sweep", "--request-rate", str(args.start_rate), "--sweep-max-probes", str(args.max_probes),
                        "--sweep-tolerance", "0.1", "--num-warmups", str(_warmups(args)), "--seed", str(seed),
                        "--temperature", "0", "--ignore-eos", "--no-plots", "--disable-tqdm",
                        "--result-dir", str(result_dir)],
                       check=True, stdout=log)
    results = BenchResults.load(str(result_dir / "results.json"))
    records = [rec for run in results.runs for rec in run.records]
    sent = [rec for rec in records if rec.success]
    # Same work on both servers: exactly --output-len tokens each, as the server's own usage counts them.
    wrong = [(rec.output_tokens, rec.output_tokens_source) for rec in sent
             if (rec.output_tokens, rec.output_tokens_source) != (args.output_len, "usage")]
    if wrong:
        raise RuntimeError(f"{base}: replies not of {args.output_len} tokens by usage: {wrong[:5]} ({result_dir})")
    at_max = next((run for run in results.runs if run.rate == results.sweep["max_goodput_rate"]), None)
    s = summarize(at_max.records, at_max.duration_s, (50.0, 99.0), slo=SLO.parse(slo)) if at_max else None
    return {"max_rate": results.sweep["max_goodput_rate"], "upper_rate": results.sweep["upper_rate"],
            "probes": [(p["rate"], p["attainment"]) for p in results.sweep["probes"]],
            "prompt_tokens": sum(rec.prompt_tokens or 0 for rec in sent), "requests": len(records),
            "failed": len(records) - len(sent),
            "ttft_p50_at_max": s.ttft.percentiles[50.0] if s else None,
            "tpot_p50_at_max": s.tpot.percentiles[50.0] if s and s.tpot.count else None,
            "hit_rate": _hit_rate(results, sent)}


def _warmups(args) -> int:
    # llama-server's prompt cache is per slot: a request finding the prefix's slot busy takes an idle one and
    # computes the prefix again. One warm-up per slot fills them all before the first probe, so no probe measures
    # cold slots (sloserve's one block cache needs one warm-up; the others hit it).
    return args.warmups if args.warmups is not None else args.parallel


def _hit_rate(results: BenchResults, sent: list) -> tuple[float, str] | None:
    """Share of prompt tokens served from cache: the server's /metrics counters (sloserve: warm-ups and each
    probe's test request included), else the replies' usage.prompt_tokens_details.cached_tokens (llama-server)."""
    counters = results.config.get("server_prefix_cache") or {}
    if counters.get("hit_rate") is not None:
        return counters["hit_rate"], "metrics"
    told = [rec for rec in sent if rec.cached_tokens is not None and rec.prompt_tokens]
    if not told:
        return None
    return sum(rec.cached_tokens for rec in told) / sum(rec.prompt_tokens for rec in told), "usage"


def _rows(sweeps: dict) -> list[dict]:
    rows = []
    for (scenario, system), rs in sweeps.items():
        rates = [r["max_rate"] or 0.0 for r in rs]
        rows.append({"scenario": scenario, "system": system, "max_rate_per_round": rates,
                     "max_rate_median": statistics.median(rates), "max_rate_min": min(rates),
                     "upper_rates": [r["upper_rate"] for r in rs], "probes": [r["probes"] for r in rs],
                     "ttft_p50_at_max_ms": [r["ttft_p50_at_max"] and r["ttft_p50_at_max"] * 1000 for r in rs],
                     "tpot_p50_at_max_ms": [r["tpot_p50_at_max"] and r["tpot_p50_at_max"] * 1000 for r in rs],
                     "hit_rate": [r["hit_rate"] for r in rs], "failed": sum(r["failed"] for r in rs),
                     "requests": sum(r["requests"] for r in rs)})
    return rows


def _print(rows: list[dict], args, slos: dict) -> None:
    print(f"\nmax goodput rate (attainment >= 90%, Poisson arrivals, {args.probe_requests} requests per probe, "
          f"fresh prompts per probe, {_warmups(args)} warm-ups at once before each sweep), {args.rounds} round(s); "
          f"{args.output_len} output tokens; SLOs {slos}; a failed request misses the SLO")
    print(f"{'scenario':<16} {'system':<13} {'rate median':>11} {'min':>6} {'per round':>18} {'TTFT p50@max':>13} "
          f"{'TPOT p50@max':>13} {'hit rate (from)':>16} {'failed':>6}")
    by = {(r["scenario"], r["system"]): r for r in rows}
    for r in rows:
        ttft = "/".join(f"{x:.0f}" if x else "-" for x in r["ttft_p50_at_max_ms"])
        tpot = "/".join(f"{x:.0f}" if x else "-" for x in r["tpot_p50_at_max_ms"])
        hits = "/".join(f"{x[0]:.0%} ({x[1]})" if x is not None else "n/a" for x in r["hit_rate"])
        rounds = "/".join(f"{x:.3g}" for x in r["max_rate_per_round"])
        print(f"{r['scenario']:<16} {r['system']:<13} {r['max_rate_median']:11.3g} {r['max_rate_min']:6.3g} "
              f"{rounds:>18} {ttft:>10} ms {tpot:>10} ms {hits:>16} {r['failed']:>6}")
    for scenario in slos:
        ours, peer = by[(scenario, "sloserve")], by[(scenario, "llama-server")]
        ratio = ours["max_rate_median"] / peer["max_rate_median"] if peer["max_rate_median"] else float("inf")
        print(f"{scenario}: max goodput rate sloserve / llama-server = {ratio:.2f} (median over rounds; target >= 1)")
    print(f"load average at the end {os.getloadavg()}; {time.strftime('%H:%M:%S')}")
