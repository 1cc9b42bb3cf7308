"""Simulated runs in the bench's results schema, so `sloserve bench report` renders and compares them."""
from __future__ import annotations

import dataclasses
import time

from sloserve.bench.results import BenchResults, Run, capture_environment
from sloserve.bench.slo import SLO
from sloserve.bench.workload import Workload
from sloserve.sim.profile import Profile
from sloserve.sim.simulate import EngineKnobs, SimOutcome


def sim_run(outcome: SimOutcome, workload: Workload, label: str) -> Run:
    return Run(
        label=label,
        arrivals=workload.arrivals.to_dict(),
        max_concurrency=workload.max_concurrency,
        num_warmups=0,  # a simulated engine has no caches to warm
        started_unix=0.0,
        duration_s=outcome.duration_s,
        records=outcome.records,
    )


def sim_results(runs: list[Run], workload: Workload, profile: Profile, profile_path: str, knobs: EngineKnobs,
                policy: str, slo: SLO | None, percentiles: tuple[float, ...], command: list[str],
                outcomes: list[SimOutcome]) -> BenchResults:
    config = {
        "workload": workload.to_dict(),
        "client": None,
        "slo": slo.to_dict() if slo else None,
        "percentiles": list(percentiles),
        "num_warmups": 0,
        "tokenizer": None,
        "sweep": None,
        "command": command,
        "simulated": True,
        "simulator": {
            "profile": profile_path,
            "engine": dataclasses.asdict(knobs),
            "policy": policy,
            # What the real run would send: greedy, ignore_eos, max_tokens = the output length.
            "sampling": {"temperature": 0.0, "ignore_eos": True},
            "step_model": {"execute": profile.execute.to_dict(), "overhead": profile.overhead.to_dict()},
            "steps": [o.num_steps for o in outcomes],
            "busy_s": [o.busy_s for o in outcomes],
        },
    }
    environment = {**capture_environment(), "simulated": True, "profiled_machine": profile.machine,
                   "model": profile.model}
    return BenchResults(config, environment, runs, None, "simulator", time.time())
