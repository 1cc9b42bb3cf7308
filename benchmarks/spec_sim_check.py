"""Simulated vs measured speculation (`benchmarks/spec_decode.py --sim-check`): TPOT p50 of off, k=4 and adaptive
(draft_model on chats) measured on the real engine and simulated from a profile with the acceptance the real run
measured, at `--sim-concurrency` levels."""
from __future__ import annotations

import os
import statistics
import time

from benchmarks.spec_decode import LLM, TARGET, configs, run_once, workload_prompts


def sim_check(args) -> None:
    """Simulated vs measured TPOT p50 for draft_model (off, k=4, adaptive) on chats: the profile gives the target's and
    the draft's step time; acceptance is the per-token rate the real run measured on this workload (the workload's)."""
    from sloserve.bench.workload import RequestSpec
    from sloserve.config import EngineConfig
    from sloserve.sim.clock import VirtualClock
    from sloserve.sim.profile import Profile
    from sloserve.sim.profiler import ProfileSettings, profile_model
    from sloserve.sim.simulate import EngineKnobs, build_sim_engine, simulate
    from sloserve.sim.speculation import SpeculationProfile, sim_speculation
    from sloserve.spec.config import SpeculativeConfig

    spec4 = configs("draft_model")["k=4"]
    if args.profile:
        prof = Profile.load(args.profile)
    else:
        start = time.perf_counter()
        prof = profile_model(EngineConfig(model=str(TARGET), dtype=args.dtype, speculative_config=spec4),
                             ProfileSettings(quick=True, engine_requests=16))
        prof.save("spec_profile.json")
        print(f"profiled target + draft (--quick grid) in {time.perf_counter() - start:.0f} s -> spec_profile.json")
    profiled = SpeculationProfile.from_dict(prof.speculative)
    print(f"profile: target execute held-out median error {prof.execute.heldout.median:.1%}, draft "
          f"{profiled.draft_execute.heldout.median:.1%}; proposal time / draft fit {profiled.draft_scale:.2f}; "
          f"per-token acceptance on its random prompts {profiled.per_token_acceptance:.2f}")
    e = prof.engine
    knobs = EngineKnobs(e["max_num_batched_tokens"], e["max_num_seqs"], e["num_kv_blocks"], e["max_model_len"],
                        e["block_size"], e["vocab_size"])
    names = {"off": None, "k=4": spec4, "adaptive": configs("draft_model")["adaptive"]}
    llms = {name: LLM(str(TARGET), dtype=args.dtype, speculative_config=spec) for name, spec in names.items()}
    chats = workload_prompts("chats", llms["off"], 0)
    print("| conc | config | measured TPOT p50 ms | simulated TPOT p50 ms | error | vs off measured / simulated | "
          "per-token acceptance (measured) | mean accepted len measured / simulated |")
    print("|---|---|---|---|---|---|---|---|")
    errors = []
    for c in (int(x) for x in args.sim_concurrency.split(",")):
        prompts = (chats * (c // len(chats) + 1))[:c]
        for llm in llms.values():
            run_once(llm, prompts[:1], 8)
        measured = {name: [] for name in llms}
        for _ in range(args.repeats):
            for name, llm in llms.items():
                measured[name].append(run_once(llm, prompts, args.max_tokens))
        specs = [RequestSpec(i, t, len(t), args.max_tokens, 0.0) for i, t in enumerate(prompts)]
        base = {}
        for name, llm in llms.items():
            real = min(measured[name], key=lambda r: r["wall"])
            speculation, alpha = None, None
            if names[name] is not None:
                alpha = llm.engine.speculator.acceptance.measured()
                speculation = sim_speculation(SpeculativeConfig.parse(names[name]), profiled, alpha or 0.0, args.seed)
            clock = VirtualClock()
            engine = build_sim_engine(prof.step_model, knobs, "fcfs", clock, speculation=speculation)
            outcome = simulate(engine, clock, specs)
            sim_tpots = [(r.token_times_s[-1] - r.token_times_s[0]) / (r.output_tokens - 1) for r in outcome.records]
            m, p = statistics.median(real["tpots"]), statistics.median(sim_tpots)
            errors.append(abs(p - m) / m)
            base.setdefault("m", m), base.setdefault("p", p)  # "off" runs first: the TPOT ratios' reference
            sim_len = engine.speculator.stats.mean_accepted_length if engine.speculator else 0.0
            print(f"| {c} | {name} | {m * 1e3:.2f} | {p * 1e3:.2f} | {(p - m) / m:+.0%} | "
                  f"{base['m'] / m:.2f}x / {base['p'] / p:.2f}x | "
                  f"{'-' if alpha is None else f'{alpha:.2f}'} | {real.get('mean_len', 0):.2f} / {sim_len:.2f} |", flush=True)
    print(f"median |error| {statistics.median(errors):.0%}, max {max(errors):.0%}; load average at end {os.getloadavg()}")
